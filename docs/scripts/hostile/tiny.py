"""Walk: the staging index memory per message, 200,000 one-element chunks staged directly (no broker)."""
import tempfile, time, os
from pathlib import Path
import torch
from fedq import wire
from fedq.aggregation.staging import StagingArea, Check
from fedq.codecs import get_codec
from fedq.protocol import UpdateMeta
from fedq.streaming import iter_container
def rss(): return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
area = StagingArea(Path(tempfile.mkdtemp()), hold_bytes=0)
N = 200_000
t = {"w": torch.randn(N)}
msgs = iter_container(t, stream="s/x", meta=UpdateMeta("u", 0).to_meta(), codec_for=lambda n, x: get_codec("fp32"), chunk_bytes=4)
r0 = rss(); t0 = time.time(); n = 0; nbytes = 0
for body in msgs:
    msg = wire.decode(body)
    st = area.append("m", msg, body)
    if msg.kind == wire.CHUNK: st.chunks[msg.index].check = Check()
    n += 1; nbytes += len(body)
    if n % 5000 == 0: area.sync()
area.sync()
print(f"{n} messages, {nbytes/2**20:.1f} MiB staged, {time.time()-t0:.1f} s, RSS +{(rss()-r0)/2**20:.0f} MiB = {(rss()-r0)/n:.0f} B/message")

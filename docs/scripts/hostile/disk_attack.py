"""Walk: one client fills the aggregator's state dir with incomplete streams (tmpfs state dir)."""
import subprocess, sys, time, uuid, os, shutil
from pathlib import Path
import torch
from fedq.broker import Management, add_client, management_url_for
from fedq.codecs import get_codec
from fedq.protocol import UpdateMeta
from fedq.safetensors import save_file
from fedq.streaming import iter_container
from fedq.topology import DEFAULT_CHUNK_BYTES, Names
from fedq.transport import connect
from tests.conftest import cleanup_namespace
from tests.test_broker_security import client_url

URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
MNT = Path(sys.argv[1]); N = int(sys.argv[2]); extra = sys.argv[3:]
ns = f"walkdisk{uuid.uuid4().hex[:8]}"; names = Names(ns)
mgmt = Management(management_url_for(URL))
tmp = Path(f"/tmp/fedq-hostile-walk/{ns}"); tmp.mkdir(parents=True)
try:
    with connect(URL) as op: op.declare(names, 1)
    urls = {}
    for who in ("alice", "mallory"):
        add_client(mgmt, f"{ns}-{who}", "pw", namespace=ns, vhost="/")
        urls[who] = client_url(URL, f"{ns}-{who}", "pw")
    x0 = {"w": torch.zeros(N)}
    init = save_file(x0, tmp / "init.safetensors")
    log = tmp / "agg.log"
    cmd = [sys.executable, "-m", "workers.aggregator", "--amqp-url", URL, "--namespace", ns, "--strategy", "fedbuff",
           "--buffer-size", "1", "--init", str(init), "--state-dir", str(MNT / "state"), "--device", "cpu", *extra]
    w = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd="/work/wt-hostile")
    t0 = time.time()
    while "version 0 from" not in log.read_text():
        assert w.poll() is None, log.read_text(); time.sleep(0.2)
    print("started", time.time() - t0, "s; df:", shutil.disk_usage(MNT))
    def stream(i, who, commit):
        msgs = list(iter_container({"w": 0.001 * torch.randn(N)}, stream=f"s/{who}{i}",
                    meta=UpdateMeta(f"{who}{i}", 0, 1).to_meta(), codec_for=lambda n, t: get_codec("fp32"),
                    chunk_bytes=DEFAULT_CHUNK_BYTES))
        return msgs if commit else msgs[:-1]
    with connect(urls["mallory"]) as m:
        for i in range(16):
            for b in stream(i, "mallory", False):
                m.publish(names.updates_exchange, names.shard_key(0), b)
            m.flush()
            time.sleep(0.3)
            print(f"mallory stream {i}: free {shutil.disk_usage(MNT).free >> 20} MiB, agg alive={w.poll() is None}")
            if w.poll() is not None: break
    time.sleep(2)
    with connect(urls["alice"]) as a:
        for b in stream(0, "alice", True):
            a.publish(names.updates_exchange, names.shard_key(0), b)
        a.flush()
    t1 = time.time()
    while time.time() - t1 < 20 and w.poll() is None and "version 1" not in log.read_text():
        time.sleep(0.2)
    print("aggregator rc:", w.poll(), "version 1 published:", "published version 1" in log.read_text() or "version 1" in log.read_text())
    print("log tail:\n", "\n".join(log.read_text().splitlines()[-12:]))
finally:
    if 'w' in dir() and w.poll() is None: w.terminate(); w.wait(30)
    cleanup_namespace(mgmt, "/", ns)

"""Walk: one client fills the aggregator's state directory with incomplete streams (a small file system).

Usage: mount -t tmpfs -o size=256m tmpfs /mnt/x; python disk_attack.py /mnt/x ELEMENTS [AGGREGATOR OPTIONS]
"""

import shutil
import sys
import time
from pathlib import Path

import torch
from walk import walk

from fedq.codecs import get_codec
from fedq.protocol import UpdateMeta
from fedq.safetensors import save_file
from fedq.streaming import iter_container
from fedq.topology import DEFAULT_CHUNK_BYTES
from fedq.transport import connect


def stream(n: int, i: int, who: str, commit: bool) -> list[bytes]:
    """The messages of ``who``'s update ``i`` in fp32, without its commit unless ``commit``."""
    msgs = list(iter_container({"w": 0.001 * torch.randn(n)}, stream=f"s/{who}{i}",
                               meta=UpdateMeta(f"{who}{i}", 0, 1).to_meta(),
                               codec_for=lambda name, t: get_codec("fp32"), chunk_bytes=DEFAULT_CHUNK_BYTES))
    return msgs if commit else msgs[:-1]


if __name__ == "__main__":
    mnt, n, options = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    with walk("walkdisk") as w:
        init = save_file({"w": torch.zeros(n)}, w.tmp / "init.safetensors")
        t0 = time.time()
        w.start_aggregator(init, "--strategy", "fedbuff", "--buffer-size", "1", *options, state=mnt / "state")
        print("started", round(time.time() - t0, 1), "s; df:", shutil.disk_usage(mnt))
        key = w.names.shard_key(0)
        with connect(w.urls["mallory"]) as m:
            for i in range(16):
                for body in stream(n, i, "mallory", commit=False):
                    m.publish(w.names.updates_exchange, key, body)
                m.flush()
                time.sleep(0.3)
                print(f"mallory stream {i}: free {shutil.disk_usage(mnt).free >> 20} MiB, aggregator alive {w.alive()}")
                if not w.alive():
                    break
        time.sleep(2)
        with connect(w.urls["alice"]) as a:
            for body in stream(n, 0, "alice", commit=True):
                a.publish(w.names.updates_exchange, key, body)
            a.flush()
        t1 = time.time()
        while time.time() - t1 < 20 and w.alive() and w.version() < 1:
            time.sleep(0.2)
        print("aggregator alive:", w.alive(), "version:", w.version())
        print("log tail:\n", "\n".join(w.log.read_text().splitlines()[-12:]))

"""Walk: queue N costly manifests (1,900 rows, 64 KiB headers) ahead of an honest update; time to the version.

Usage: python manifest_flood.py N manifest|bigjunk|junk
"""

import os
import sys
import time

from walk import walk

from fedq import wire
from fedq.protocol import UpdateMeta
from fedq.safetensors import save_file
from fedq.transport import connect
from tests.aggregation_helpers import delta_for, small_model
from tests.test_hostile import messages


def manifest(i: int, stream: str) -> bytes:
    """A manifest of 1,900 one-element tensors: costly to parse, refused by every shard of a smaller model."""
    meta = UpdateMeta(f"j{i}", 0).to_meta()
    meta["tensors"] = [[f"t{r:08d}", "float32", [1], "fp32", 1, 1] for r in range(1900)]
    meta["chunks"] = 1900
    return wire.encode_control(wire.MANIFEST, stream, meta)


def junk(kind: str, i: int) -> bytes:
    if kind == "manifest":
        return manifest(i, f"s/j{i}")
    return os.urandom(53313) if kind == "bigjunk" else b"junk %d" % i


if __name__ == "__main__":
    n, kind = int(sys.argv[1]), sys.argv[2]
    with walk("walkman") as w:
        x0 = small_model()
        w.start_aggregator(save_file(x0, w.tmp / "init.safetensors"), "--buffer-size", "1")
        bodies = [junk(kind, i) for i in range(n)]
        key = w.names.shard_key(0)
        with connect(w.urls["mallory"]) as m, connect(w.urls["alice"]) as a:
            for body in bodies:
                m.publish(w.names.updates_exchange, key, body)
            m.flush()
            t0 = time.time()
            for body in messages(delta_for(1, x0), "a"):
                a.publish(w.names.updates_exchange, key, body)
            a.flush()
        while w.version() < 1 and time.time() - t0 < 300:
            time.sleep(0.05)
        print(f"{n} x {kind} ({len(bodies[0])} B) queued ahead: version 1 after {time.time() - t0:.2f} s; "
              f"refused {w.refused()}")

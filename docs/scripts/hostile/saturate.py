"""Walk: one client keeps the update queue full (BOUND=1: under the 16 MiB queue policy of docs/operating.md);
when does an honest update fold?

Usage: [BOUND=1] python saturate.py manifest|bigjunk SECONDS
"""

import os
import sys
import threading
import time

import pika
from manifest_flood import manifest
from walk import Walk, walk

from fedq.safetensors import save_file
from fedq.transport import connect
from tests.aggregation_helpers import delta_for, send_update, small_model

TEMPLATE = b"s/j%012d"


def flood(w: Walk, body: bytes, stop: threading.Event, sent: list[int], manifests: bool) -> None:
    """Publish as fast as the broker takes them (no confirms), each manifest under a stream id of its own."""
    connection = pika.BlockingConnection(pika.URLParameters(w.urls["mallory"]))
    channel = connection.channel()
    props = pika.BasicProperties(user_id=f"{w.ns}-mallory")
    while not stop.is_set():
        sent[0] += 1
        message = body.replace(TEMPLATE % 0, TEMPLATE % sent[0]) if manifests else body
        channel.basic_publish(w.names.updates_exchange, w.names.shard_key(0), message, props)
    connection.close()


if __name__ == "__main__":
    kind, seconds = sys.argv[1], float(sys.argv[2])
    policy = None
    with walk("walksat") as w:
        if os.environ.get("BOUND"):
            policy = f"/policies/%2F/{w.ns}-bound"
            definition = {"max-length-bytes": 16 << 20}
            w.mgmt.put(policy, {"pattern": f"^{w.ns}\\.updates\\.", "apply-to": "queues", "definition": definition})
        try:
            x0 = small_model()
            w.start_aggregator(save_file(x0, w.tmp / "init.safetensors"), "--buffer-size", "1")
            body = manifest(0, (TEMPLATE % 0).decode()) if kind == "manifest" else os.urandom(53313)
            stop, sent = threading.Event(), [0]
            threads = [threading.Thread(target=flood, args=(w, body, stop, sent, kind == "manifest")) for _ in range(2)]
            for t in threads:
                t.start()
            time.sleep(3)
            q = w.mgmt.get(f"/queues/%2F/{w.names.updates_queue(0)}")
            print(f"after 3 s: queue {q.get('message_bytes', 0) >> 20} MiB, {q.get('messages')} messages; "
                  f"mallory sent {sent[0]}")
            t0, published = time.time(), [None]

            def honest() -> None:
                with connect(w.urls["alice"]) as a:
                    send_update(a, w.names, delta_for(1, x0), shards=1, update_id="a", base_version=0)
                published[0] = time.time() - t0

            threading.Thread(target=honest, daemon=True).start()
            while w.version() < 1 and time.time() - t0 < seconds:
                time.sleep(0.1)
            during = time.time() - t0 if w.version() >= 1 else None
            stop.set()
            for t in threads:
                t.join()
            t1 = time.time()
            while w.version() < 1 and time.time() - t1 < 120:
                time.sleep(0.1)
            print(f"{kind}: alice's publish done after {published[0]} s; version 1 during the flood: {during}; "
                  f"after the flood stopped: {time.time() - t1:.1f} s (version {w.version()}); "
                  f"mallory sent {sent[0]}; aggregator refused {w.refused()}")
        finally:
            if policy is not None:
                w.mgmt.delete(policy)

"""CPU time per update on the client: ``fedq.Client.send`` of the demo model's update (nf4, error feedback on,
as clients send by default) and ``send_container`` of it without feedback (what ``fedq bench scale``'s
clients send), into the in-memory transport, at one torch thread. Used for docs/performance.md ("The
client's CPU per update"); run from a checkout with ``PYTHONPATH`` set to it:

    python docs/scripts/client_send_cost.py --sends 200 --json PATH

It prints one JSON object: per case the median, 10th and 90th percentile CPU milliseconds per send (process
time: every thread), and a digest of the chunk messages of the first rounds (index, name, codec, meta and
payload; the stream name holds a random update id) so that two trees can be compared byte for byte. The
client is given its received version directly (a base store holding random weights), not through an
aggregator: only the send is measured.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedq import wire
from fedq.basestore import BaseStore
from fedq.bench.scale import _delta, _meta, demo_shapes
from fedq.client import Client, codec_policy
from fedq.streaming import send_container, shard_of
from fedq.topology import Names
from fedq.transport import Transport, connect

Shapes = dict[str, tuple[int, ...]]


def _drain(transport: Transport, digest: Any | None) -> None:
    """Take every published update off the queue, hashing its chunks into ``digest`` where given."""
    while (delivery := transport.get(0)) is not None:
        if digest is not None:
            for msg, _ in wire.decode_all(delivery.body):
                if msg.kind == wire.CHUNK:
                    digest.update(f"{msg.index} {msg.name} {msg.codec} {msg.codec_meta}".encode())
                    digest.update(bytes(msg.payload))
        transport.ack(delivery)


def _transport() -> tuple[Transport, Names]:
    names = Names(f"sendcost{uuid.uuid4().hex[:8]}")
    transport = connect(f"memory://{names.namespace}")
    transport.declare(names, 1)
    transport.consume(names.updates_queue(0), prefetch=1 << 20)
    return transport, names


def client_send(shapes: Shapes, codec: str, rounds: int, hashed: int) -> tuple[list[float], str]:
    """``Client.send`` of a model that moves by a fresh random step every round (error feedback on)."""
    transport, names = _transport()
    g = torch.Generator().manual_seed(0)
    base = {name: torch.randn(shape, generator=g) * 0.02 for name, shape in shapes.items()}
    client = Client("bench", transport=transport, namespace=names.namespace, codec=codec)
    store = BaseStore()
    for name, value in base.items():
        store.reserve(name, tuple(value.shape), value.dtype)
        store.write(name, 0, value.reshape(-1))
    # the state a receive of version 0 leaves (a harness: no aggregator runs here)
    client._base, client.version, client._shapes = store, 0, dict(shapes)
    client._assignment = shard_of({n: 4 * math.prod(s) for n, s in shapes.items()}, 1)
    local = {name: value.clone() for name, value in base.items()}
    digest = hashlib.sha256()
    cpu = []
    for r in range(rounds):
        for value in local.values():
            value.add_(torch.randn(value.shape, generator=g) * 1e-3)
        start = time.process_time()
        client.send(local, num_samples=1)
        cpu.append(time.process_time() - start)
        _drain(transport, digest if r < hashed else None)
    client.close()
    return cpu, digest.hexdigest()[:16]


def bench_scale_send(shapes: Shapes, codec: str, rounds: int, hashed: int) -> tuple[list[float], str]:
    """``send_container`` of one fixed delta without error feedback, as ``fedq bench scale``'s clients."""
    transport, names = _transport()
    delta, codec_for = _delta(shapes), codec_policy(codec)
    digest = hashlib.sha256()
    cpu = []
    for r in range(rounds):
        start = time.process_time()
        send_container(
            transport,
            names.updates_exchange,
            names.shard_key(0),
            delta,
            stream="c/u/s0",
            meta=_meta("c", "u", 0),
            codec_for=codec_for,
            pack=True,
        )
        cpu.append(time.process_time() - start)
        _drain(transport, digest if r < hashed else None)
    transport.close()
    return cpu, digest.hexdigest()[:16]


CASES: dict[str, Callable[[Shapes, str, int, int], tuple[list[float], str]]] = {
    "client_send_error_feedback": client_send,
    "send_container_no_feedback": bench_scale_send,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sends", type=int, default=200, help="sends measured per case")
    parser.add_argument("--warmup", type=int, default=20, help="sends before the measured ones")
    parser.add_argument("--codec", default="nf4")
    parser.add_argument("--label", default="", help="a name for this tree in the output")
    parser.add_argument("--json", metavar="PATH", help="also append the result as a JSON line to PATH")
    args = parser.parse_args()
    torch.set_num_threads(1)
    shapes = demo_shapes()
    out: dict[str, Any] = {
        "label": args.label,
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_average": os.getloadavg()[0],
        "torch_threads": torch.get_num_threads(),
    }
    for case, run in CASES.items():
        cpu, digest = run(shapes, args.codec, args.warmup + args.sends, args.warmup + 5)
        ms = [1e3 * c for c in cpu[args.warmup :]]
        deciles = statistics.quantiles(ms, n=10)
        out[case] = {
            "median_ms": round(statistics.median(ms), 2),
            "p10_ms": round(deciles[0], 2),
            "p90_ms": round(deciles[-1], 2),
            "chunks_sha256": digest,
        }
    print(json.dumps(out), flush=True)
    if args.json:
        with Path(args.json).open("a") as f:
            f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()

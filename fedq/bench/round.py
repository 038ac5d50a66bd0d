"""``fedq bench round``: one whole federated round as a user lives it, each party in its own process.

An aggregator process (``workers.aggregator``, FedAvg over N updates, one version) starts from a random model
of the named shapes; N client processes (spawned) each run the three calls of ``fedq.Client``: ``receive``
version 0 into a model of their own (fp32 or ``--dtype bf16``), a fake training step (every tensor perturbed
in place, slice by slice), ``send`` (``--codec``), and ``receive`` version 1. Through the local broker.

Measured: ``round_seconds`` from the clients' start to the last client holding version 1; ``bytes_up`` the
update bytes the clients published, ``bytes_down`` the bytes they read from the models stream for version 1
(the round's new version: a whole version, or with ``--model-codec int8/nf4`` one delta), both against the
fp32 bytes of the same tensors (``fp32_bytes_up``, ``fp32_bytes_down`` = N × the model); peak RSS of each
process as its own ``VmHWM`` (a spawned child's ``ru_maxrss`` starts at its parent's). ``codec`` is the
clients' upload codec; versions travel in ``--model-codec`` (whole in fp32, bf16 or fp16; as deltas with
error feedback in int8 or nf4).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import queue
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from fedq.aggregation import checkpoint
from fedq.bench import broker_url
from fedq.bench.aggregate import _PeakRss, _wait_for, _write_model
from fedq.bench.stream import SHAPES, delete_namespace
from fedq.errors import BenchError
from fedq.topology import Names

_SLICE = 1 << 24  # elements perturbed at a time: the fake step allocates no model-sized temporary
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def run(args: argparse.Namespace) -> int:
    url = broker_url(args.amqp_url)
    logging.getLogger("pika").setLevel(logging.WARNING)
    shapes = SHAPES[args.shapes]()
    fp32_bytes = 4 * sum(_numel(s) for s in shapes.values())
    work = Path(args.dir or tempfile.mkdtemp(prefix="fedq-bench-round-"))
    init = work / "init.safetensors"
    _write_model(init, shapes, scale=0.02, seed=0)
    print(f"{args.shapes}: {fp32_bytes / 4e9:.3f} B parameters, {fp32_bytes / 2**20:.0f} MiB", flush=True)
    names = Names(f"bench{uuid.uuid4().hex[:10]}")
    log = work / "aggregator.log"
    cmd = [
        sys.executable,
        "-m",
        "workers.aggregator",
        *("--amqp-url", url, "--namespace", names.namespace, "--strategy", "fedavg"),
        *("--min-clients", str(args.clients), "--max-versions", "1", "--init", str(init)),
        # the round is every client's update: on a loaded machine one client can lag the others by minutes
        *("--round-timeout", str(args.timeout)),
        *("--state-dir", str(work / "state"), "--threads", str(args.threads)),
        *("--model-codec", args.model_codec),
    ]
    try:
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[2])
        aggregator_peak = _PeakRss(proc.pid)
        _wait_for(log, "version 0 announced", proc)
        job = {
            **{"url": url, "namespace": names.namespace, "codec": args.codec, "dtype": args.dtype},
            "shapes": args.shapes,
        }
        ctx = mp.get_context("spawn")
        results: mp.Queue[dict[str, Any]] = ctx.Queue()
        start = time.time()
        clients = [
            ctx.Process(target=_client, args=({**job, "name": f"c{i}", "seed": i}, results))
            for i in range(args.clients)
        ]
        for p in clients:
            p.start()
        rows = _gather(results, clients, start + args.timeout)
        for p in clients:
            p.join()
        if failed := [r["error"] for r in rows if "error" in r]:
            raise BenchError(f"a client failed: {failed[0]}")
        if proc.wait(timeout=args.timeout) != 0:
            raise BenchError(f"aggregator failed; see {log}")
        aggregator_peak.stop()
        folded = _folded_updates(work / "state")
        if folded != args.clients:
            raise BenchError(f"version 1 folded {folded} of {args.clients} updates; see {log}")
    finally:
        if proc.poll() is None:
            proc.kill()
        delete_namespace(url, names)
        if args.dir is None:  # a failed run keeps its log only: a Llama-3.2-1B run leaves 18 GB otherwise
            init.unlink(missing_ok=True)
            shutil.rmtree(work / "state", ignore_errors=True)
    row = {
        "clients": args.clients,
        "codec": args.codec,
        "round_seconds": max(r["done"] for r in rows) - start,
        "bytes_up": sum(r["bytes_up"] for r in rows),
        "bytes_down": sum(r["bytes_down"] for r in rows),
        "fp32_bytes_up": sum(r["fp32_bytes_up"] for r in rows),
        "fp32_bytes_down": args.clients * fp32_bytes,
        "aggregator_peak_rss": aggregator_peak.bytes,
        "client_peak_rss": max(r["peak_rss"] for r in rows),
        "model_fp32_bytes": fp32_bytes,
    }
    print(_describe(row, args), flush=True)
    if args.dir is None:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=2))
        print(f"wrote {args.json}")
    return 0


def _gather(results: mp.Queue[dict[str, Any]], clients: list[Any], deadline: float) -> list[dict[str, Any]]:
    """Every client's row; a client that died without one (the OOM killer's SIGKILL leaves no traceback) ends
    the bench at once, instead of at its timeout."""
    rows: list[dict[str, Any]] = []
    while len(rows) < len(clients):
        try:
            rows.append(results.get(timeout=2.0))
            continue
        except queue.Empty:
            pass
        if dead := [(i, p.exitcode) for i, p in enumerate(clients) if p.exitcode not in (None, 0)]:
            i, code = dead[0]
            raise BenchError(f"client c{i} died with exit code {code} (-9: killed, e.g. by the OOM killer)")
        if time.time() > deadline:
            raise BenchError(f"{len(clients) - len(rows)} client(s) not done by the bench's --timeout")
    return rows


def _folded_updates(state_dir: Path) -> int:
    """How many updates the last version folded, from shard 0's checkpoint (its last plan)."""
    state = json.loads((state_dir / "shard-0" / checkpoint.STATE).read_text())
    return len((state.get("last_plan") or {}).get("updates", []))


def _describe(row: dict[str, Any], args: argparse.Namespace) -> str:
    model = row["model_fp32_bytes"]
    moved = row["bytes_up"] + row["bytes_down"]
    reference = row["fp32_bytes_up"] + row["fp32_bytes_down"]
    return (
        f"{args.shapes} ({args.dtype} clients, versions in {args.model_codec}), {row['clients']} clients, "
        f"{row['codec']}: round "
        f"{row['round_seconds']:.1f} s; up {row['bytes_up'] / 2**20:.0f} MiB "
        f"({row['bytes_up'] / row['fp32_bytes_up']:.1%} of fp32), down {row['bytes_down'] / 2**20:.0f} MiB "
        f"({row['bytes_down'] / row['fp32_bytes_down']:.1%}), up+down {moved / reference:.1%}; peak RSS "
        f"aggregator {row['aggregator_peak_rss'] / 2**20:.0f} MiB ({row['aggregator_peak_rss'] / model:.2f}x "
        f"the fp32 model), client {row['client_peak_rss'] / 2**20:.0f} MiB "
        f"({row['client_peak_rss'] / model:.2f}x)"
    )


def _client(job: dict[str, Any], results: mp.Queue[dict[str, Any]]) -> None:
    """One client process: receive, fake step, send, receive the next version; reports to ``results``."""
    from fedq.client import Client

    torch.set_num_threads(1)
    try:
        model: dict[str, torch.Tensor] = {}
        with Client(job["name"], amqp_url=job["url"], namespace=job["namespace"], codec=job["codec"]) as c:
            for name, shape in SHAPES[job["shapes"]]().items():  # a bf16 client's tensors are bf16
                model[name] = torch.empty(shape, dtype=_DTYPES[job["dtype"]])
            c.receive(model, timeout=3600)
            _fake_step(model, job["seed"])
            sent = c.send(model, num_samples=1)
            before = c.received_bytes
            version = c.receive(model, timeout=3600).version
            done = time.time()
            assert version == 1, version
            results.put(
                {
                    "done": done,
                    "bytes_up": sent.wire_bytes,
                    "fp32_bytes_up": sent.fp32_bytes,
                    "bytes_down": c.received_bytes - before,
                    "peak_rss": _vm_hwm(),
                }
            )
    except BaseException as exc:
        results.put({"error": repr(exc)})
        raise


def _fake_step(model: dict[str, torch.Tensor], seed: int) -> None:
    """Every tensor perturbed in place by N(0, 1e-3), a slice at a time (a stand-in for local training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.values():
            flat = t.view(-1)
            for lo in range(0, flat.numel(), _SLICE):
                piece = flat[lo : lo + _SLICE]
                piece.add_(torch.randn(piece.numel(), generator=g).to(piece.dtype), alpha=1e-3)


def _vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n

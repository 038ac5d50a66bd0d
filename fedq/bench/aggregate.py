"""``fedq bench aggregate``: aggregator memory vs number of client updates, fold throughput, end-to-end time.

For each client count N, a fresh aggregator process (``workers.aggregator``, FedBuff with K = N, one version)
receives N nf4 delta updates through the local broker. The delta is written to a file first and sent from it
slice by slice (as ``fedq send`` does), so that this process holds no model beside the aggregator's. Its peak
RSS is the high-water mark of its own address space (``VmHWM``, polled from /proc while it runs, and the value
the worker logs when it stops), not ``wait4``'s ``ru_maxrss``: Linux carries the parent's RSS at fork into the
child's ``ru_maxrss`` across ``exec``, so ``ru_maxrss`` of a process started by this one reports at least
this process's RSS. ``e2e_seconds`` is the time from the first client's encode start to the aggregator's
"folded" log line (wall clocks of one machine). In the same run, the raw broker time of the model's fp32
bytes (pika publish -> consume of pre-made bodies, same chunk size, persistent) is measured with
fedq.bench.stream's baseline, and fold throughput (decode + fold, no broker) is timed in this process on the
fold device.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from fedq import wire
from fedq.bench import broker_url
from fedq.bench.stream import SHAPES, delete_namespace, raw_receive, raw_send, run_pair
from fedq.codecs import get_codec
from fedq.errors import BenchError
from fedq.protocol import UpdateMeta, update_stream
from fedq.safetensors import SafetensorsReader, SafetensorsWriter, TensorSpec
from fedq.streaming import send_container
from fedq.topology import Names
from fedq.transport import connect

_FOLDED = re.compile(r"^(\S+ \S+) INFO \S+: shard 0: version \d+: folded .* in ([0-9.]+) s, scale")
_GRAM = re.compile(r"shard 0: Gram matrix of \d+ updates for version \d+ in ([0-9.]+) s")
_FILL = 1 << 24
_PEAK = re.compile(r"peak RSS (\d+) bytes")
_PEAK_GPU = re.compile(r"peak GPU memory (\d+) bytes")


def run(args: argparse.Namespace) -> int:
    url = broker_url(args.amqp_url)
    torch.set_num_threads(max(1, args.threads))
    logging.getLogger("pika").setLevel(logging.WARNING)  # one INFO line per connection event otherwise
    shapes = SHAPES[args.shapes]()
    numel = sum(_numel(s) for s in shapes.values())
    fp32_bytes = 4 * numel
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    work = Path(args.dir or tempfile.mkdtemp(prefix="fedq-bench-aggregate-"))
    init = work / "init.safetensors"
    _write_model(init, shapes, scale=0.02, seed=0)
    # the clients' delta is sent from a file, read slice by slice: this process never holds a model, so the
    # aggregator alone can take the memory (FedAdam at llama-3.2-1b: model + m + v = 3 x 5716 MiB)
    _write_model(work / "delta.safetensors", shapes, scale=1e-3, seed=1)
    delta = SafetensorsReader(work / "delta.safetensors")
    print(
        f"{args.shapes}: {numel / 1e9:.3f} B parameters, {fp32_bytes / 2**20:.0f} MiB fp32; device {device}"
    )
    fold_rate = _fold_throughput(delta, args.codec, args.chunk_bytes, torch.device(device))
    print(
        f"fold throughput ({args.codec} decode + fold, {device}): {fold_rate:.0f} M parameters/s", flush=True
    )
    raw_names = Names(f"bench{uuid.uuid4().hex[:10]}")
    with connect(url) as t:
        t.declare(raw_names, 1)
    job = {
        "namespace": raw_names.namespace,
        "url": url,
        "nbytes": fp32_bytes,
        "chunk_bytes": args.chunk_bytes,
        "budget": None,  # 16 chunks in flight whatever the process's RSS (a CUDA torch alone holds ~500 MiB)
    }
    try:
        raw = run_pair(mp.get_context("spawn"), raw_send, raw_receive, job)["seconds"]
    finally:
        delete_namespace(url, raw_names)
    print(f"raw broker time of the fp32 bytes: {raw:.2f} s ({fp32_bytes / raw / 1e6:.0f} MB/s)", flush=True)
    rows = []
    for clients in args.clients:
        row = _one_run(url, work, init, delta, clients, args, device)
        row |= {
            "model_fp32_bytes": fp32_bytes,
            "raw_fp32_broker_seconds": raw,
            "fold_mparams_s": fold_rate,
            "device": device,
        }
        rows.append(row)
        print(_describe(row), flush=True)
    delta.close()
    if args.dir is None:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
        print(f"wrote {args.json}")
    return 0


def _describe(row: dict[str, Any]) -> str:
    model = row["model_fp32_bytes"]
    gpu = row.get("aggregator_peak_gpu")
    e2e = row["e2e_seconds"]
    return (
        f"{row['strategy']} {row['clients']:3d} clients: "
        f"aggregator peak RSS {row['aggregator_peak_rss'] / 2**20:.0f} MiB "
        f"({row['aggregator_peak_rss'] / model:.2f}x the fp32 model), "
        + (f"peak GPU {gpu / 2**20:.0f} MiB ({gpu / model:.2f}x), " if gpu is not None else "")
        + f"e2e {e2e:.2f} s ({e2e / row['raw_fp32_broker_seconds']:.2f}x the raw "
        f"fp32 broker time), plan-time fold {row['aggregator_fold_seconds']:.2f} s "
        f"({row['aggregator_fold_mparams_s']:.0f} M parameters/s)"
    )


def _one_run(
    url: str,
    work: Path,
    init: Path,
    delta: SafetensorsReader,
    clients: int,
    args: argparse.Namespace,
    device: str,
) -> dict[str, Any]:
    names = Names(f"bench{uuid.uuid4().hex[:10]}")
    state = work / f"state-{names.namespace}"
    log = work / f"aggregator-{clients}.log"
    with connect(url) as t:
        t.declare(names, 1)
    cmd = [
        sys.executable,
        "-m",
        "workers.aggregator",
        "--amqp-url",
        url,
        "--namespace",
        names.namespace,
        *strategy_arguments(args.strategy, clients),
        "--init",
        str(init),
        "--state-dir",
        str(state),
        "--device",
        device,
        "--chunk-bytes",
        str(args.chunk_bytes),
        "--threads",
        str(args.threads),
        # the N updates come from one broker user: it gets the staging quota N users would have
        "--max-streams-per-user",
        str(clients),
        "--max-user-bytes",
        str(clients * (init.stat().st_size + (64 << 20))),
    ]
    try:
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[2])
        peak = _PeakRss(proc.pid)
        _wait_for(log, "version 0 announced", proc)
        codec = get_codec(args.codec)
        start = time.time()
        with connect(url) as client:
            for i in range(clients):
                send_container(
                    client,
                    names.updates_exchange,
                    names.shard_key(0),
                    delta,
                    stream=update_stream("bench", f"bench-{i}", 0),
                    meta=UpdateMeta(f"bench-{i}", 0).to_meta(),
                    codec_for=lambda name, t: codec,
                    chunk_bytes=args.chunk_bytes,
                )
        _, status, _ = os.wait4(proc.pid, 0)
        peak.stop()
        if status != 0:
            raise BenchError(f"aggregator failed ({status}); see {log}")
        lines = log.read_text().splitlines()
        folds = [m for line in lines if (m := _FOLDED.match(line))]
        folded_at = datetime.strptime(folds[-1].group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        # every version's fold, and the Gram pass of Krum / centered clipping
        fold_seconds = sum(float(m.group(2)) for m in folds)
        fold_seconds += sum(float(m.group(1)) for line in lines if (m := _GRAM.search(line)))
        logged = [int(m.group(1)) for line in lines if (m := _PEAK.search(line))]
        gpu = [int(m.group(1)) for line in lines if (m := _PEAK_GPU.search(line))]
        return {
            "strategy": args.strategy,
            "clients": clients,
            "aggregator_peak_rss": max([peak.bytes, *logged]),
            **({"aggregator_peak_gpu": max(gpu)} if gpu else {}),
            "e2e_seconds": folded_at - start,
            # the plan-time fold inside the aggregator (read, decode and fold of every planned update)
            "aggregator_fold_seconds": fold_seconds,
            "aggregator_fold_mparams_s": clients * _params(delta) / max(fold_seconds, 1e-3) / 1e6,
        }
    finally:
        delete_namespace(url, names)


def strategy_arguments(strategy: str, clients: int) -> list[str]:
    """``fedq aggregator`` options that fold ``clients`` updates with ``strategy``: one version of all of them
    (FedAsync: one version per update); robust rules and server optimizers over FedBuff with K = clients."""
    if strategy == "fedasync":
        return ["--strategy", "fedasync", "--staleness-fn", "constant", "--max-versions", str(clients)]
    if strategy == "fedavg":
        return ["--strategy", "fedavg", "--min-clients", str(clients), "--max-versions", "1"]
    base = ["--strategy", "fedbuff", "--buffer-size", str(clients), "--staleness-fn", "constant"]
    base += ["--max-versions", "1"]
    if strategy in ("median", "trimmed-mean", "krum", "multi-krum", "centered-clipping"):
        # Krum's f: the most its guarantee allows with these K (K > 2f + 2)
        return [*base, "--rule", strategy, "--byzantine", str(max(0, (clients - 3) // 2))]
    if strategy in ("fedavgm", "fedadam", "fedyogi", "fedadagrad"):
        return [*base, "--server-opt", strategy.removeprefix("fed")]
    if strategy == "dp":
        return [*base, "--dp-noise", "1.0", "--dp-population", str(100 * clients)]
    return base


class _PeakRss:
    """Polls a process's VmHWM (the high-water mark of its RSS, which only grows) until ``stop``."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        self.pid, self.interval, self.bytes = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with open(f"/proc/{self.pid}/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            self.bytes = max(self.bytes, int(line.split()[1]) * 1024)
            except (OSError, ValueError):
                pass  # gone (or a zombie without an address space)
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _wait_for(log: Path, text: str, proc: subprocess.Popen[bytes], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            lines = log.read_text(errors="replace").strip().splitlines() or ["no output"]
            raise BenchError(f"the aggregator exited with status {proc.returncode} ({lines[-1]}); see {log}")
        time.sleep(0.1)
    raise BenchError(f"aggregator did not log {text!r} within {timeout} s")


def _fold_throughput(
    delta: SafetensorsReader, codec_name: str, chunk_bytes: int, device: torch.device
) -> float:
    """M parameters/s of the aggregator's fold path over (up to) 256 M parameters of encoded chunks: wire
    decode (header, checksum) + ``wire.add_tensor`` into model-sized float32 sums on the fold device."""
    codec = get_codec(codec_name)
    per_chunk = max(1, chunk_bytes // codec.payload_nbytes(codec.alignment)) * codec.alignment
    bodies: list[bytes] = []
    names: set[str] = set()
    total = 0
    for name, spec in delta.specs.items():
        names.add(name)
        for lo, piece in zip(range(0, spec.numel, per_chunk), _slices(delta, name, per_chunk), strict=True):
            bodies.append(
                wire.encode_chunk(
                    stream="bench",
                    index=len(bodies),
                    name=name,
                    dtype=spec.dtype,
                    shape=spec.shape,
                    offset=lo,
                    count=piece.numel(),
                    codec=codec,
                    x=piece,
                )
            )
            total += piece.numel()
            if total >= 256 << 20:
                break
        if total >= 256 << 20:
            break
    sums = {n: torch.zeros(s.numel, device=device) for n, s in delta.specs.items() if n in names}
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for body in bodies:
        msg = wire.decode(body)
        wire.add_tensor(msg, sums[msg.name][msg.offset : msg.offset + msg.count], 1.0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return total / (time.perf_counter() - start) / 1e6


def _slices(reader: SafetensorsReader, name: str, per_chunk: int) -> Iterator[torch.Tensor]:
    """Tensor ``name`` of the file in slices of ``per_chunk`` elements, each a copy read from disk."""
    n = reader.specs[name].numel
    pieces = reader.stream([(name, lo, min(per_chunk, n - lo)) for lo in range(0, n, per_chunk)])
    return (piece.clone() for piece in pieces)


def _write_model(path: Path, shapes: dict[str, tuple[int, ...]], *, scale: float, seed: int) -> None:
    """Written slice by slice so this process does not hold a second model."""
    g = torch.Generator().manual_seed(seed)
    writer = SafetensorsWriter(path, {n: TensorSpec(torch.float32, s) for n, s in shapes.items()})
    for name, shape in shapes.items():
        n = _numel(shape)
        for lo in range(0, n, _FILL):
            writer.write(name, lo, torch.randn(min(_FILL, n - lo), generator=g) * scale)
    writer.commit()


def _params(tensors: SafetensorsReader) -> int:
    return sum(s.numel for s in tensors.specs.values())


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n

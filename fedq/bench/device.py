"""``fedq bench device``: the client's encode and the aggregator's fold on whatever device is here.

Three figures, each the median of three timed runs after a warm-up, on one model's shapes (N(0, 0.02)
deltas, already on the device):

- ``encode + copy``: every chunk of the update through ``Codec.encode`` (encoded on the device, only the
  payload copied to the host, waited for): what a GPU client's encode costs before framing. G elem/s.
- ``send path``: the whole container a client sends (``streaming.iter_container`` with error feedback:
  residuals on the device, encode, copy, framing with checksum and compression probe). G elem/s.
- ``fold``: ``Folder.fold`` of K staged updates into a model on the device, the aggregator's own code
  (pipelined on a GPU: the next window's chunks read, checksummed and copied on the copy stream while this
  one folds). G params/s, counting K × parameters.

Targets (issue 17, on an H100/H200): nf4 fold >= 20 G params/s; nf4 encode + copy >= 20 G elem/s.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fedq import wire
from fedq.aggregation.admission import Admitted
from fedq.aggregation.fold import Folder
from fedq.aggregation.staging import ChunkRef, StagingArea
from fedq.bench.codecs import SHAPES
from fedq.codecs import Codec, ErrorFeedback, get_codec
from fedq.device import resolve
from fedq.protocol import Plan, PlanEntry
from fedq.streaming import chunk_elements_for, iter_container
from fedq.threads import cpu_workers
from fedq.topology import DEFAULT_CHUNK_BYTES

_RUNS = 3


def run(args: argparse.Namespace) -> int:
    device = resolve(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    g = torch.Generator(device=device).manual_seed(0)
    delta = {
        n: torch.randn(shape, generator=g, device=device).mul_(0.02) for n, shape in SHAPES[args.shapes]()
    }
    numel = sum(t.numel() for t in delta.values())
    print(
        f"{args.shapes}: {numel / 1e6:.1f} M parameters, codec {args.codec}, device {device} ({name}), "
        f"{torch.get_num_threads()} torch threads, {args.updates} updates folded"
    )
    rows = [
        ("encode + copy", "G elem/s", numel, _timed(device, lambda: _encode(delta, args.codec))),
        ("send path", "G elem/s", numel, _timed(device, lambda: _send(delta, args.codec))),
        ("fold", "G params/s", args.updates * numel, _fold_seconds(delta, args.codec, args.updates, device)),
    ]
    print("| measure | unit | elements | seconds (median of 3) | rate |")
    print("|---|---|---|---|---|")
    for measure, unit, count, seconds in rows:
        print(f"| {measure} | {unit} | {count / 1e6:.1f} M | {seconds:.3f} | {count / seconds / 1e9:.2f} |")
    return 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, work: Callable[[], object]) -> float:
    """Median seconds of ``_RUNS`` runs of ``work`` after an untimed warm-up, the device drained around
    each."""
    work()
    times = []
    for _ in range(_RUNS):
        _sync(device)
        start = time.perf_counter()
        work()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _encode(delta: dict[str, torch.Tensor], codec_name: str) -> None:
    """Every chunk through ``Codec.encode``, in the chunks a sender cuts."""
    codec = get_codec(codec_name)
    step = chunk_elements_for(codec, DEFAULT_CHUNK_BYTES)
    for t in delta.values():
        for piece in t.reshape(-1).split(step):
            codec.encode(piece)


def _send(delta: dict[str, torch.Tensor], codec_name: str) -> None:
    codec = get_codec(codec_name)
    feedback = ErrorFeedback()
    for _ in iter_container(delta, stream="bench", meta={}, codec_for=lambda n, t: codec, feedback=feedback):
        pass


def _fold_seconds(
    delta: dict[str, torch.Tensor], codec_name: str, updates: int, device: torch.device
) -> float:
    """Median seconds of ``Folder.fold`` of ``updates`` staged copies of ``delta`` into a model on the
    device."""
    with tempfile.TemporaryDirectory(prefix="fedq-bench-device-") as work:
        staging = StagingArea(Path(work))
        entries = stage_updates(staging, delta, get_codec(codec_name), updates)
        model = {n: torch.zeros_like(t) for n, t in delta.items()}
        folder = Folder(model, staging, device, cpu_workers() if device.type == "cpu" else 1)
        plan = Plan(version=1, scale=1.0 / updates, updates=[e for e, _ in entries])
        seconds = _timed(device, lambda: folder.fold(entries, plan))
        staging.close()
    return seconds


def stage_updates(
    staging: StagingArea, delta: dict[str, torch.Tensor], codec: Codec, updates: int
) -> list[tuple[PlanEntry, Admitted]]:
    """``updates`` copies of ``delta`` staged as a client's delta streams would be, admitted as they are
    (weight 1 each): the plan entries a fold takes."""
    entries = []
    for i in range(updates):
        stream = f"u{i}"
        staged = None
        for body in iter_container(delta, stream=stream, meta={}, codec_for=lambda n, t: codec):
            staged = staging.append("bench", wire.decode(body), body) or staged
        assert staged is not None
        by_tensor: dict[str, list[ChunkRef]] = {}
        for index in sorted(staged.chunks):
            ref = staged.chunks[index]
            by_tensor.setdefault(ref.name, []).append(ref)
        admitted = Admitted(staged, stream, "bench", 0, 1, "delta", 0.0, {}, by_tensor)
        entries.append((PlanEntry(stream, 1.0, "bench", 0), admitted))
    return entries

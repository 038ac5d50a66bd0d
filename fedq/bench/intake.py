"""``fedq bench intake``: the aggregator's own CPU per update, without a broker or clients beside it.

``fedq bench scale`` measures the loop a deployment runs, but on one machine the aggregator's CPU figure
moves with everything else running there (clients encoding, the broker, other work). This puts ``--updates``
updates of the demo model (each from its own client, the codec policy of ``--codec``, packed as
``fedq.Client.send`` packs them) on an in-process broker first, then runs one aggregator (FedBuff with K =
``--buffer-size``, every other setting at the ``fedq aggregator`` defaults that matter here: one torch
thread, 64 MiB of intake, CPU fold) in this process until it has folded them all, and reports the process's
CPU seconds and the wall time per update, by phase where ``--phases`` is given. The final model's SHA-256 is
printed too: two trees that fold the same updates into the same bits print the same digest. The
aggregator's INFO log (~3 lines per update) is not written.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import logging
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from fedq.aggregation import checkpoint
from fedq.aggregation.fold import Folder
from fedq.aggregation.service import Aggregator, Settings
from fedq.aggregation.strategies import FedBuff
from fedq.bench.aggregate import _write_model
from fedq.bench.scale import _meta, demo_shapes
from fedq.cli.aggregator import intake, max_message_bytes
from fedq.client import codec_policy
from fedq.streaming import send_container
from fedq.topology import Names
from fedq.transport import connect

# what each phase of ``--phases`` times (the rest of the loop is what is left of the total)
PHASES = {
    "intake": (Aggregator, "_on_update_message"),
    "fold": (Folder, "fold"),
    "version": (Aggregator, "_apply"),
}


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    logging.getLogger("fedq").setLevel(logging.WARNING)  # its ~3 INFO lines per update, not on the terminal
    work = Path(tempfile.mkdtemp(prefix="fedq-bench-intake-"))
    try:
        row = measure(work, args.updates, args.buffer_size, args.codec, phases=args.phases)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"{row['updates']} {args.codec} demo updates, FedBuff K = {args.buffer_size}: aggregator "
        f"{1e3 * row['cpu_s_per_update']:.2f} ms CPU/update, {1e3 * row['wall_s_per_update']:.2f} ms "
        f"wall/update; model sha256 {row['model_sha256'][:16]}"
    )
    for phase, seconds in row.get("phases", {}).items():
        print(f"  {phase:8s} {1e3 * seconds:.2f} ms CPU/update")
    return 0


def measure(work: Path, updates: int, k: int, codec: str, *, phases: bool = False) -> dict[str, Any]:
    """Publish ``updates`` demo updates, fold them all, and return the aggregator's CPU and wall seconds
    per update (and per phase when ``phases``) with the final model's digest."""
    shapes = demo_shapes()
    work.mkdir(parents=True, exist_ok=True)
    init = work / "init.safetensors"
    _write_model(init, shapes, scale=0.02, seed=0)
    broker, names = f"intake{uuid.uuid4().hex[:8]}", Names(f"bench{uuid.uuid4().hex[:10]}")
    with connect(f"memory://clients@{broker}") as t:
        t.declare(names, 1)
        for i in range(updates):
            g = torch.Generator().manual_seed(i)
            delta = {name: torch.randn(shape, generator=g) * 1e-3 for name, shape in shapes.items()}
            send_container(
                t,
                names.updates_exchange,
                names.shard_key(0),
                delta,
                stream=f"c{i}/u{i}/s0",
                meta=_meta(f"c{i}", f"u{i}", 0),
                codec_for=codec_policy(codec),
                pack=True,
            )
        t.flush()
    chunk_bytes = 4 << 20
    prefetch, hold = intake(64 << 20, chunk_bytes)
    settings = Settings(
        names=names,
        strategy=FedBuff(buffer_size=k, server_lr=1.0, staleness="polynomial:0.5"),
        init=init,
        state_dir=work / "state",
        max_versions=updates // k,
        prefetch=prefetch,
        hold_bytes=hold,
        max_message_bytes=max_message_bytes(chunk_bytes),
        max_streams_per_user=updates + 16,  # the updates share one broker user, as in ``fedq bench scale``
        max_user_bytes=1 << 40,
    )
    spent: dict[str, float] = dict.fromkeys(PHASES, 0.0)
    with connect(f"memory://aggregator@{broker}") as t, _timed(spent, enabled=phases):
        aggregator = Aggregator(t, settings)
        cpu, wall = time.process_time(), time.monotonic()
        aggregator.run()
        cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    folded = aggregator.state.version * k
    row: dict[str, Any] = {
        "updates": folded,
        "cpu_s_per_update": cpu / folded,
        "wall_s_per_update": wall / folded,
        "model_sha256": _digest(work / "state" / "shard-0"),
    }
    if phases:
        row["phases"] = {phase: spent[phase] / folded for phase in PHASES}
    return row


@contextmanager
def _timed(spent: dict[str, float], *, enabled: bool) -> Iterator[None]:
    """While open, each of ``PHASES`` adds its CPU seconds to ``spent`` (this thread's phases run one at a
    time, so their CPU is the process's while they run)."""
    if not enabled:
        yield
        return
    saved = {phase: getattr(cls, name) for phase, (cls, name) in PHASES.items()}
    for phase, (cls, name) in PHASES.items():
        setattr(cls, name, _counting(saved[phase], spent, phase))
    try:
        yield
    finally:
        for phase, (cls, name) in PHASES.items():
            setattr(cls, name, saved[phase])


def _counting(f: Callable[..., Any], spent: dict[str, float], phase: str) -> Callable[..., Any]:
    @functools.wraps(f)
    def counted(*args: Any, **kwargs: Any) -> Any:
        began = time.process_time()
        try:
            return f(*args, **kwargs)
        finally:
            spent[phase] += time.process_time() - began

    return counted


def _digest(directory: Path) -> str:
    loaded = checkpoint.load(directory, torch.device("cpu"))
    assert loaded is not None
    h = hashlib.sha256()
    for name in sorted(loaded[0]):
        h.update(loaded[0][name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()

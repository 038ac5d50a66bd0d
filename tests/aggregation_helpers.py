"""Helpers shared by the aggregator tests: a small model, update publishers, and a worker in a thread."""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from fedq.aggregation import checkpoint
from fedq.aggregation.server_opt import STATE_PREFIX
from fedq.aggregation.service import Aggregator, Settings
from fedq.aggregation.strategies import FedAvg, FedBuff, Strategy
from fedq.codecs import get_codec
from fedq.protocol import UpdateMeta, update_stream
from fedq.safetensors import save_file
from fedq.streaming import iter_container, send_container, shard_of
from fedq.topology import Names
from fedq.transport import Transport, connect


def small_model(seed: int = 0, scale: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed": torch.randn(64 * scale, 32, generator=g),
        "layer.weight": torch.randn(32, 48 * scale, generator=g),
        "layer.bias": torch.randn(48 * scale, generator=g),
        "head": torch.randn(16 * scale, 32, generator=g),
    }


def delta_for(seed: int, model: dict[str, torch.Tensor], size: float = 0.01) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    return {n: size * torch.randn(t.shape, generator=g) for n, t in model.items()}


def write_init(tmp: Path, model: dict[str, torch.Tensor]) -> Path:
    return save_file(model, tmp / "init.safetensors")


def send_update(
    transport: Transport,
    names: Names,
    tensors: dict[str, torch.Tensor],
    *,
    shards: int,
    update_id: str,
    base_version: int,
    kind: str = "delta",
    num_samples: int = 1,
    codec: str = "fp32",
    chunk_bytes: int = 4096,
    commit: bool = True,
) -> None:
    """One update as one container stream per shard, the way a client sends it."""
    assignment = shard_of({n: 4 * t.numel() for n, t in tensors.items()}, shards)
    meta = UpdateMeta(update_id, base_version, num_samples, kind).to_meta()
    for shard in range(shards):
        part = {n: t for n, t in tensors.items() if assignment[n] == shard}
        stream = update_stream("update", update_id, shard)
        codec_for = lambda name, t: get_codec(codec)  # noqa: E731
        if commit:
            send_container(
                transport,
                names.updates_exchange,
                names.shard_key(shard),
                part,
                stream=stream,
                meta=meta,
                codec_for=codec_for,
                chunk_bytes=chunk_bytes,
            )
        else:
            messages = list(
                iter_container(part, stream=stream, meta=meta, codec_for=codec_for, chunk_bytes=chunk_bytes)
            )
            for body in messages[:-2]:  # manifest and all chunks but the last, no commit
                transport.publish(names.updates_exchange, names.shard_key(shard), body)
            transport.flush()


def every_update() -> FedAvg:
    """One version per update, x + Δ exactly: the global model shows what each update carried."""
    return FedAvg(min_clients=1, round_timeout=60.0)


def settings(names: Names, strategy: Strategy, init: Path, state_dir: Path, **options: Any) -> Settings:
    return Settings(names=names, strategy=strategy, init=init, state_dir=state_dir, **options)


class Worker:
    """An aggregator shard running in a thread with its own connection."""

    def __init__(self, url: str, config: Settings) -> None:
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.config = config
        self.thread = threading.Thread(target=self._run, args=(url,), daemon=True)
        self.thread.start()

    def _run(self, url: str) -> None:
        try:
            with connect(url) as transport:
                Aggregator(transport, self.config).run(self.stop)
        except BaseException as exc:
            self.error = exc

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.stop.set()
            self.thread.join(10)
            raise AssertionError(f"aggregator did not finish within {timeout} s")
        if self.error is not None:
            raise self.error


def state(state_dir: Path, shard: int = 0) -> dict[str, Any]:
    try:
        return json.loads((state_dir / f"shard-{shard}" / checkpoint.STATE).read_text())
    except (FileNotFoundError, ValueError):
        return {}


def wait_version(state_dir: Path, version: int, timeout: float = 30, shards: int = 1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (
            all(state(state_dir, s).get("published", -1) >= version for s in range(shards))
            and state(state_dir).get("announced", -1) >= version
        ):
            return
        time.sleep(0.05)
    raise AssertionError(f"version {version} not reached in {timeout} s: {state(state_dir)}")


def model_of(state_dir: Path, shards: int = 1, prefix: str = "") -> dict[str, torch.Tensor]:
    """The checkpointed tensors of every shard whose names start with ``prefix`` (the model's by default;
    ``server_opt.STATE_PREFIX``: the server optimizer's state, kept in the same file)."""
    out: dict[str, torch.Tensor] = {}
    for shard in range(shards):
        loaded = checkpoint.load(state_dir / f"shard-{shard}", torch.device("cpu"))
        assert loaded is not None
        out.update(
            (n, t)
            for n, t in loaded[0].items()
            if n.startswith(prefix) and (prefix or not n.startswith(STATE_PREFIX))
        )
    return out


def memory_broker(shards: int = 2) -> tuple[str, Names]:
    """A fresh in-process broker name and namespace, with the topology for ``shards`` shards declared."""
    name = f"agg-{uuid.uuid4().hex[:8]}"
    names = Names(f"t{uuid.uuid4().hex[:8]}")
    with connect(f"memory://setup@{name}") as t:
        t.declare(names, shards)
    return name, names


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float = 1e-6) -> None:
    """Same tensor names, each within ``tol`` relative difference (max abs diff / max abs of ``b``)."""
    assert a.keys() == b.keys()
    for name in a:
        diff = float((a[name] - b[name]).abs().max()) / max(float(b[name].abs().max()), 1e-12)
        assert diff <= tol, f"{name}: relative difference {diff}"


def one_step_worker(broker: str, names: Names, init: Path, state_dir: Path, **options: Any) -> Worker:
    """An in-memory aggregator that steps after every update with weight 1 (x += Δ): easy to predict."""
    strategy = FedBuff(buffer_size=1, server_lr=1.0, staleness="constant")
    return Worker(f"memory://aggregator@{broker}", settings(names, strategy, init, state_dir, **options))


def wait_aggregator_started(log: Path, offset: int, timeout: float = 60) -> None:
    """Until the newest aggregator process in ``log`` (from byte ``offset`` on) has loaded its state, so that
    a kill lands in its work, not in its imports."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(log, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        if "resumed at version" in text or "version 0 from" in text:
            return
        time.sleep(0.05)
    raise AssertionError(f"aggregator did not start: {log.read_text()[-2000:]}")

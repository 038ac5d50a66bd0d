"""The aggregator's checks of complete streams, its windowed fold, and what survives a restart."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import msgpack
import torch

from fedq import metrics, wire
from fedq.aggregation.service import MAX_CLIENT_METRICS
from fedq.aggregation.staging import stream_key
from fedq.aggregation.strategies import FedAvg, FedBuff, NormBound
from fedq.codecs import get_codec
from fedq.streaming import iter_container
from fedq.topology import Names
from fedq.transport import Transport, connect
from fedq.transport.base import REASON_HEADER
from tests.aggregation_helpers import (
    Worker,
    assert_close,
    delta_for,
    memory_broker,
    model_of,
    one_step_worker,
    send_update,
    settings,
    small_model,
    state,
    wait_version,
    write_init,
)


def _messages(
    tensors: dict[str, torch.Tensor],
    update_id: str,
    *,
    codec: str = "fp32",
    chunk_bytes: int = 4096,
    **meta: Any,
) -> list[bytes]:
    return list(
        iter_container(
            tensors,
            stream=f"update/{update_id}",
            meta={"update_id": update_id, "base_version": 0, "kind": "delta", "num_samples": 1, **meta},
            codec_for=lambda n, t: get_codec(codec),
            chunk_bytes=chunk_bytes,
        )
    )


def _publish(t: Transport, names: Names, bodies: list[bytes]) -> None:
    for body in bodies:
        t.publish(names.updates_exchange, names.shard_key(0), body)
    t.flush()


def _header(body: bytes) -> dict[str, Any]:
    header_len = int.from_bytes(body[6:8], "big")
    header: dict[str, Any] = msgpack.unpackb(body[8 : 8 + header_len], raw=False)
    return header


def _reframe(body: bytes, **changes: Any) -> bytes:
    """A chunk with header fields changed (the payload and its CRC stay valid)."""
    header_len = int.from_bytes(body[6:8], "big")
    packed = msgpack.packb({**_header(body), **changes}, use_bin_type=True)
    return body[:6] + len(packed).to_bytes(2, "big") + packed + body[8 + header_len :]


def _count(counter: Any, **labels: str) -> float:
    return sum(
        s.value
        for f in counter.collect()
        for s in f.samples
        if s.name.endswith("_total") and s.labels == labels
    )


def _dead_letter_reasons(t: Transport, names: Names) -> list[str]:
    t.consume(names.dead_letter_queue, prefetch=100)
    reasons = []
    while (delivery := t.get(0.5)) is not None:
        reasons.append(str(delivery.headers.get(REASON_HEADER)))
        t.ack(delivery)
    return sorted(reasons)


def test_updates_with_different_chunk_layouts_fold_like_whole_tensors(tmp_path: Path) -> None:
    """Windows follow one update's chunks; others' chunks straddle them (sizes, codecs, full weights)."""
    broker, names = memory_broker(1)
    x0 = small_model(scale=4)
    init = write_init(tmp_path, x0)
    worker = Worker(
        f"memory://aggregator@{broker}",
        settings(names, FedAvg(min_clients=3, round_timeout=60), init, tmp_path / "state", max_versions=1),
    )
    d0, d1 = delta_for(0, x0), delta_for(1, x0)
    x2 = {
        n: t + 0.01 * torch.randn(t.shape, generator=torch.Generator().manual_seed(5)) for n, t in x0.items()
    }
    with connect(f"memory://alice@{broker}") as alice:
        send_update(
            alice, names, d0, shards=1, update_id="a", base_version=0, chunk_bytes=4096, num_samples=1
        )
        send_update(
            alice,
            names,
            d1,
            shards=1,
            update_id="b",
            base_version=0,
            codec="bf16",
            chunk_bytes=1500,
            num_samples=2,
        )
        send_update(
            alice,
            names,
            x2,
            shards=1,
            update_id="c",
            base_version=0,
            kind="full",
            chunk_bytes=2600,
            num_samples=1,
        )
        worker.join(30)
    bf16 = {n: t.to(torch.bfloat16).float() for n, t in d1.items()}
    expected = {n: x0[n] + (d0[n] + 2 * bf16[n] + (x2[n] - x0[n])) / 4 for n in x0}
    assert_close(model_of(tmp_path / "state"), expected, tol=1e-5)


def test_commit_count_dtype_codec_and_base_version_are_checked(tmp_path: Path) -> None:
    broker, names = memory_broker(1)
    x0 = small_model()
    init = write_init(tmp_path, x0)
    worker = one_step_worker(broker, names, init, tmp_path / "state", max_versions=1)
    d = delta_for(3, x0)
    commit = _messages(d, "commit")
    commit[-1] = wire.encode_control(wire.COMMIT, "update/commit", {"chunks": 999})
    codec = _messages(d, "codec")
    h = _header(codec[1])  # the same slice, bf16-coded where the manifest says fp32
    codec[1] = wire.encode_chunk(
        stream=h["stream"],
        index=h["index"],
        name=h["name"],
        dtype=torch.float32,
        shape=tuple(h["shape"]),
        offset=h["offset"],
        count=h["count"],
        codec=get_codec("bf16"),
        x=torch.zeros(h["count"]),
    )
    dtype = _messages(d, "dtype")
    dtype[1] = _reframe(dtype[1], dtype="bfloat16")
    negative = _messages(d, "negative", base_version=-1)
    with connect(f"memory://mallory@{broker}") as mallory, connect(f"memory://alice@{broker}") as alice:
        for bodies in (commit, codec, dtype, negative):
            _publish(mallory, names, bodies)
        send_update(alice, names, delta_for(1, x0), shards=1, update_id="ok", base_version=0)
        worker.join(30)
        reasons = _dead_letter_reasons(alice, names)
    assert reasons == ["bad_manifest", "bad_manifest", "bad_manifest", "commit_mismatch"]
    ok = delta_for(1, x0)
    assert_close(model_of(tmp_path / "state"), {n: x0[n] + ok[n] for n in x0})
    assert not list((tmp_path / "state" / "shard-0" / "staging").glob("*.stage"))


def test_a_refused_stream_stays_refused_after_a_version_step(tmp_path: Path) -> None:
    """Before and after a restart alike: late messages of a refused stream are acked without effect."""
    broker, names = memory_broker(1)
    x0 = small_model()
    init = write_init(tmp_path, x0)
    worker = one_step_worker(broker, names, init, tmp_path / "state", max_versions=2)
    refused = _messages(delta_for(2, x0), "refused", base_version=-1)
    before = _count(metrics.CHUNKS, role="aggregator", event="duplicate")
    with connect(f"memory://mallory@{broker}") as mallory, connect(f"memory://alice@{broker}") as alice:
        _publish(mallory, names, refused[:1])  # the manifest: refused, the stream remembered
        send_update(alice, names, delta_for(1, x0), shards=1, update_id="a", base_version=0)
        wait_version(tmp_path / "state", 1)
        _publish(mallory, names, refused[1:])  # after the step: still acked without effect
        send_update(alice, names, delta_for(4, x0), shards=1, update_id="b", base_version=1)
        worker.join(30)
    after = _count(metrics.CHUNKS, role="aggregator", event="duplicate")
    assert after - before == len(refused) - 1
    assert stream_key("mallory", "update/refused") in state(tmp_path / "state")["finished"]


def test_client_metric_labels_are_bounded(tmp_path: Path) -> None:
    broker, names = memory_broker(1)
    x0 = small_model()
    init = write_init(tmp_path, x0)
    worker = one_step_worker(broker, names, init, tmp_path / "state", max_versions=3)
    client = f"eve{uuid.uuid4().hex[:6]}"
    with connect(f"memory://{client}@{broker}") as eve:
        for version in range(3):
            many = {f"m{version}_{i}": float(i) for i in range(20)}
            bad = {"Bad-Name": 1.0, "x" * 40: 2.0, "nan": float("nan"), "flag": True}
            meta = {"metrics": {"loss": 0.5, **bad, **many}, "base_version": version}
            _publish(eve, names, _messages(delta_for(version, x0), f"u{version}", **meta))
            wait_version(tmp_path / "state", version + 1)
        worker.join(30)
    labels = {
        s.labels["metric"]
        for f in metrics.CLIENT_METRIC.collect()
        for s in f.samples
        if s.labels["client"] == client
    }
    assert "loss" in labels
    assert len(labels) <= MAX_CLIENT_METRICS
    assert all(name.isidentifier() and name == name.lower() and len(name) <= 32 for name in labels)


def test_norm_bound_after_a_restart_uses_the_recomputed_norm(tmp_path: Path) -> None:
    """Chunk norms are measured on arrival and kept in memory only: a restarted worker measures its staged
    streams again, and the clip factor comes out the same."""
    broker, names = memory_broker(1)
    x0 = small_model()
    init = write_init(tmp_path, x0)
    d0, d1 = delta_for(0, x0, 1.0), delta_for(1, x0, 0.001)
    bound = 0.5 * float(torch.cat([t.reshape(-1) for t in d0.values()]).norm())

    def config(versions: int) -> Any:
        return settings(
            names,
            FedBuff(buffer_size=2, server_lr=1.0, staleness="constant"),
            init,
            tmp_path / "state",
            max_versions=versions,
            norm_bound=NormBound(bound, clip=True),
        )

    first = Worker(f"memory://aggregator@{broker}", config(1))
    committed = _count(metrics.UPDATES, role="aggregator", event="committed")
    with connect(f"memory://alice@{broker}") as alice:
        send_update(alice, names, d0, shards=1, update_id="a", base_version=0)
        deadline = time.monotonic() + 30
        while _count(metrics.UPDATES, role="aggregator", event="committed") == committed:
            assert time.monotonic() < deadline, "update a not committed"
            time.sleep(0.05)
        first.stop.set()
        first.join(30)
        assert state(tmp_path / "state")["version"] == 0
        second = Worker(f"memory://aggregator@{broker}", config(1))
        send_update(alice, names, d1, shards=1, update_id="b", base_version=0)
        second.join(30)
    expected = {n: x0[n] + (0.5 * d0[n] + d1[n]) / 2 for n in x0}
    assert_close(model_of(tmp_path / "state"), expected, tol=1e-5)

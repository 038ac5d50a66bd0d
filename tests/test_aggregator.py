"""The aggregator service end to end over the in-memory broker (and two shards over the real one)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch

from fedq import metrics, wire
from fedq.aggregation import checkpoint
from fedq.aggregation.strategies import FedAsync, FedAvg, FedBuff
from fedq.codecs import get_codec
from fedq.streaming import iter_container, receive_container
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


def test_fedbuff_two_versions_with_staleness_and_server_lr(tmp_path: Path) -> None:
    broker, names = memory_broker(1)
    x0 = small_model()
    init = write_init(tmp_path, x0)
    strategy = FedBuff(buffer_size=2, server_lr=0.5, staleness="polynomial:0.5")
    worker = Worker(
        f"memory://aggregator@{broker}",
        settings(names, strategy, init, tmp_path / "state", max_versions=2, chunk_bytes=4096),
    )
    d = [delta_for(i, x0) for i in range(4)]
    with connect(f"memory://alice@{broker}") as alice, connect(f"memory://bob@{broker}") as bob:
        send_update(alice, names, d[0], shards=1, update_id="a", base_version=0)
        send_update(bob, names, d[1], shards=1, update_id="b", base_version=0, codec="bf16")
        wait_version(tmp_path / "state", 1)
        send_update(alice, names, d[2], shards=1, update_id="c", base_version=0)  # staleness 1
        send_update(bob, names, d[3], shards=1, update_id="d", base_version=1)
        worker.join(30)
        bf16 = {n: t.to(torch.bfloat16).float() for n, t in d[1].items()}
        x1 = {n: x0[n] + 0.5 * (d[0][n] + bf16[n]) / 2 for n in x0}
        x2 = {n: x1[n] + 0.5 * (d[2][n] / math.sqrt(2) + d[3][n]) / 2 for n in x0}
        assert_close(model_of(tmp_path / "state"), x2)
        # the published stream of version 2 carries the same model
        got = receive_container(
            alice,
            names.models_stream,
            "model/v2/s0",
            consume_arguments={"x-stream-offset": "first"},
            timeout=10,
        )
        assert_close(dict(got.tensors), x2)
        assert got.manifest.meta["version"] == 2


def test_incomplete_update_is_dropped_and_contributes_nothing(tmp_path: Path) -> None:
    broker, names = memory_broker(1)
    x0 = small_model()
    init = write_init(tmp_path, x0)
    worker = one_step_worker(broker, names, init, tmp_path / "state", max_versions=1, update_timeout=0.5)
    with connect(f"memory://alice@{broker}") as alice:
        send_update(
            alice, names, delta_for(9, x0, 5.0), shards=1, update_id="dead", base_version=0, commit=False
        )
        send_update(alice, names, delta_for(1, x0), shards=1, update_id="ok", base_version=0)
        worker.join(30)
    d = delta_for(1, x0)
    assert_close(model_of(tmp_path / "state"), {n: x0[n] + d[n] for n in x0})


def _dropped_incomplete() -> float:
    return sum(
        s.value
        for family in metrics.UPDATES.collect()
        for s in family.samples
        if s.name.endswith("_total") and s.labels == {"role": "aggregator", "event": "dropped_incomplete"}
    )


def _publish_slowly(t: Transport, names: Names, bodies: list[bytes], gap: float) -> None:
    """Each message confirmed, then a pause: a client on a slow link."""
    for body in bodies:
        t.publish(names.updates_exchange, names.shard_key(0), body)
        t.flush()
        time.sleep(gap)


def test_update_timeout_counts_inactivity_and_late_messages_are_dead_lettered(tmp_path: Path) -> None:
    """A stream that takes longer than the timeout but never pauses that long is folded; one that goes quiet
    for longer is dropped, and what comes of it later is dead-lettered ("expired"), not acked silently."""
    broker, names = memory_broker(1)
    x0 = small_model()
    init = write_init(tmp_path, x0)
    timeout, gap = 0.8, 0.25
    worker = one_step_worker(broker, names, init, tmp_path / "state", max_versions=2, update_timeout=timeout)
    d_slow, d_quiet, d_ok = (delta_for(i, x0) for i in range(3))

    def messages(update_id: str, delta: dict[str, torch.Tensor], base_version: int) -> list[bytes]:
        meta = {"update_id": update_id, "base_version": base_version, "kind": "delta", "num_samples": 1}
        return list(iter_container(delta, stream=f"update/{update_id}/s0", meta=meta, chunk_bytes=4096))

    with connect(f"memory://alice@{broker}") as alice:
        slow = messages("slow", d_slow, 0)
        assert len(slow) * gap > 2 * timeout  # the whole transfer outlasts the timeout
        _publish_slowly(alice, names, slow, gap)
        wait_version(tmp_path / "state", 1)
        quiet = messages("quiet", d_quiet, 1)
        dropped = _dropped_incomplete()
        _publish_slowly(alice, names, quiet[:-2], 0)
        deadline = time.monotonic() + 10 * timeout
        while _dropped_incomplete() == dropped:
            assert time.monotonic() < deadline, "the quiet stream was not dropped"
            time.sleep(0.05)
        _publish_slowly(alice, names, quiet[-2:], 0)  # its last chunk and commit, too late
        send_update(alice, names, d_ok, shards=1, update_id="ok", base_version=1)
        worker.join(30)
        alice.consume(names.dead_letter_queue, prefetch=10)
        late = []
        while (delivery := alice.get(0.5)) is not None:
            late.append((delivery.body, delivery.headers.get(REASON_HEADER)))
            alice.ack(delivery)
    assert late == [(body, "expired") for body in quiet[-2:]]
    assert_close(model_of(tmp_path / "state"), {n: x0[n] + d_slow[n] + d_ok[n] for n in x0})


def test_stale_update_is_dead_lettered_with_its_reason(tmp_path: Path) -> None:
    broker, names = memory_broker(1)
    x0 = small_model()
    init = write_init(tmp_path, x0)
    worker = Worker(
        f"memory://aggregator@{broker}",
        settings(
            names,
            FedAsync(alpha=0.5, staleness="constant"),
            init,
            tmp_path / "state",
            max_versions=3,
            max_staleness=1,
        ),
    )
    d = [delta_for(i, x0) for i in range(4)]
    with connect(f"memory://alice@{broker}") as alice:
        send_update(alice, names, d[0], shards=1, update_id="a", base_version=0)
        wait_version(tmp_path / "state", 1)
        send_update(alice, names, d[1], shards=1, update_id="b", base_version=0)  # staleness 1: accepted
        wait_version(tmp_path / "state", 2)
        send_update(alice, names, d[2], shards=1, update_id="c", base_version=0)  # staleness 2: refused
        send_update(alice, names, d[3], shards=1, update_id="d", base_version=2)
        worker.join(30)
        alice.consume(names.dead_letter_queue, prefetch=10)
        reasons = []
        while (delivery := alice.get(0.5)) is not None:
            reasons.append(delivery.headers.get(REASON_HEADER))
            alice.ack(delivery)
    assert reasons == ["stale"]
    expected = {n: x0[n] + 0.5 * d[0][n] + 0.5 * d[1][n] + 0.5 * d[3][n] for n in x0}
    assert_close(model_of(tmp_path / "state"), expected)


def test_full_updates_fedavg_and_duplicates_count_once(tmp_path: Path) -> None:
    broker, names = memory_broker(1)
    x0 = small_model()
    init = write_init(tmp_path, x0)
    worker = Worker(
        f"memory://aggregator@{broker}",
        settings(names, FedAvg(min_clients=2, round_timeout=60), init, tmp_path / "state", max_versions=1),
    )
    xa, xb = small_model(1), small_model(2)
    with connect(f"memory://alice@{broker}") as alice, connect(f"memory://bob@{broker}") as bob:
        send_update(alice, names, xa, shards=1, update_id="a", base_version=0, kind="full", num_samples=1)
        send_update(alice, names, xa, shards=1, update_id="a", base_version=0, kind="full", num_samples=1)
        send_update(bob, names, xb, shards=1, update_id="b", base_version=0, kind="full", num_samples=3)
        worker.join(30)
    assert_close(model_of(tmp_path / "state"), {n: (xa[n] + 3 * xb[n]) / 4 for n in x0}, tol=1e-5)


def test_bad_input_is_dead_lettered_and_the_model_is_untouched(tmp_path: Path) -> None:
    broker, names = memory_broker(1)
    x0 = small_model()
    init = write_init(tmp_path, x0)
    worker = one_step_worker(broker, names, init, tmp_path / "state", max_versions=1)
    key = names.shard_key(0)
    nan = {n: torch.full_like(t, float("nan")) for n, t in x0.items()}
    with connect(f"memory://mallory@{broker}") as mallory, connect(f"memory://alice@{broker}") as alice:
        mallory.publish(names.updates_exchange, key, b"not a fedq message")
        unknown = wire.encode_chunk(
            stream="x",
            index=0,
            name="nope",
            dtype=torch.float32,
            shape=(2,),
            offset=0,
            count=2,
            codec=get_codec("fp32"),
            x=torch.ones(2),
        )
        mallory.publish(names.updates_exchange, key, unknown)
        mallory.flush()
        send_update(mallory, names, {"head": torch.ones(3, 3)}, shards=1, update_id="shape", base_version=0)
        send_update(mallory, names, nan, shards=1, update_id="nan", base_version=0)
        send_update(alice, names, delta_for(1, x0), shards=1, update_id="ok", base_version=0)
        worker.join(30)
        alice.consume(names.dead_letter_queue, prefetch=100)
        reasons = set()
        while (delivery := alice.get(0.5)) is not None:
            reasons.add(delivery.headers.get(REASON_HEADER))
            alice.ack(delivery)
    assert {"bad_magic", "unknown_tensor", "shape_mismatch", "nonfinite"} <= reasons
    d = delta_for(1, x0)
    assert_close(model_of(tmp_path / "state"), {n: x0[n] + d[n] for n in x0})
    assert state(tmp_path / "state")["version"] == 1


def _sharded_run(url_for, names: Names, tmp: Path, shards: int) -> dict[str, torch.Tensor]:
    x0 = small_model(scale=4)
    init = write_init(tmp, x0)
    strategy = FedBuff(buffer_size=2, server_lr=0.7, staleness="polynomial:0.5")
    workers = [
        Worker(
            url_for("aggregator"),
            settings(
                names, strategy, init, tmp / "state", shard=i, shards=shards, max_versions=2, chunk_bytes=8192
            ),
        )
        for i in range(shards)
    ]
    with connect(url_for("alice")) as alice:
        send_update(
            alice, names, delta_for(0, x0), shards=shards, update_id="a", base_version=0, codec="fp16"
        )
        send_update(alice, names, delta_for(1, x0), shards=shards, update_id="b", base_version=0)
        wait_version(tmp / "state", 1, shards=shards)
        send_update(alice, names, delta_for(2, x0), shards=shards, update_id="c", base_version=0)
        send_update(alice, names, delta_for(3, x0), shards=shards, update_id="d", base_version=1)
    for w in workers:
        w.join(60)
    return model_of(tmp / "state", shards)


def test_two_shards_equal_one_in_memory(tmp_path: Path) -> None:
    models = []
    for shards in (1, 2):
        broker, names = memory_broker(shards)
        run_dir = tmp_path / f"run{shards}"
        run_dir.mkdir()
        models.append(_sharded_run(lambda user, b=broker: f"memory://{user}@{b}", names, run_dir, shards))
    assert_close(models[1], models[0])


@pytest.mark.broker
def test_two_shards_equal_one_on_the_broker(tmp_path: Path, amqp_url: str, namespace: str) -> None:
    models = []
    for shards in (1, 2):
        names = Names(f"{namespace}-{shards}")
        with connect(amqp_url) as t:
            t.declare(names, shards)
        run_dir = tmp_path / f"run{shards}"
        run_dir.mkdir()
        models.append(_sharded_run(lambda user: amqp_url, names, run_dir, shards))
    assert_close(models[1], models[0])


def test_folding_windows_in_threads_gives_the_same_bits_as_one_thread(tmp_path: Path) -> None:
    """Windows are disjoint slices of the model: folded by 3 threads or 1, deltas and a full update, mixed
    codecs and chunk sizes (so windows hold pieces of several chunks), the model is bit-identical."""
    x0 = small_model(scale=16)
    init = write_init(tmp_path, x0)
    updates = [
        (delta_for(0, x0), "delta", "nf4", 8192),
        (delta_for(1, x0), "delta", "int8", 20000),
        ({n: x0[n] + 0.01 * d for n, d in delta_for(2, x0).items()}, "full", "bf16", 4096),
    ]
    models = []
    for threads in (1, 3):
        broker, names = memory_broker(1)
        state_dir = tmp_path / f"threads{threads}"
        strategy = FedBuff(buffer_size=3, server_lr=0.7, staleness="constant")
        config = settings(names, strategy, init, state_dir, max_versions=1, fold_threads=threads)
        worker = Worker(f"memory://aggregator@{broker}", config)
        with connect(f"memory://client@{broker}") as client:
            for i, (tensors, kind, codec, chunk_bytes) in enumerate(updates):
                send_update(
                    client,
                    names,
                    tensors,
                    shards=1,
                    update_id=f"u{i}",
                    base_version=0,
                    kind=kind,
                    codec=codec,
                    chunk_bytes=chunk_bytes,
                )
        worker.join(60)
        models.append(model_of(state_dir))
    assert models[0].keys() == models[1].keys()
    for name in models[0]:
        assert torch.equal(models[0][name], models[1][name]), name
    assert not torch.equal(models[0]["embed"], x0["embed"])


@pytest.mark.parametrize("codec", ["nf4", "fp32"])
def test_k_small_chunks_folded_together_give_the_bits_of_one_at_a_time(tmp_path: Path, codec: str) -> None:
    """The K updates' chunks of a window are decoded in one batch (``wire.add_tensors``); the version is the
    one the fold one chunk at a time gives, bit for bit: per window, 0 + f_1 Δ_1 + ... + f_K Δ_K in plan
    order, then x += scale * that."""
    x0 = small_model()
    init = write_init(tmp_path, x0)
    broker, names = memory_broker(1)
    strategy = FedBuff(buffer_size=4, server_lr=0.7, staleness="constant")
    worker = Worker(
        f"memory://aggregator@{broker}",
        settings(names, strategy, init, tmp_path / "state", max_versions=1, chunk_bytes=4096),
    )
    deltas = [delta_for(i, x0) for i in range(4)]
    with connect(f"memory://client@{broker}") as client:
        for i, d in enumerate(deltas):
            send_update(client, names, d, shards=1, update_id=f"u{i}", base_version=0, codec=codec)
    worker.join(60)
    want = {n: t.clone() for n, t in x0.items()}
    chunks = [
        [
            wire.decode(body)
            for body in iter_container(
                d, stream="s", meta={}, codec_for=lambda n, t: get_codec(codec), chunk_bytes=4096
            )
        ][1:-1]
        for d in deltas
    ]
    for pieces in zip(*chunks, strict=True):
        first = pieces[0]
        window = torch.zeros(first.count)
        for msg in pieces:
            wire.add_tensor(msg, window, 1.0)
        want[first.name].view(-1)[first.offset : first.offset + first.count].add_(window, alpha=0.7 / 4)
    got = model_of(tmp_path / "state")
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_the_version_a_shard_starts_from_has_the_time_its_checkpoint_was_made(tmp_path: Path) -> None:
    """``fedq status`` and the stalled-version alert read it before the first step (it was unset)."""
    broker, names = memory_broker(1)
    init = write_init(tmp_path, small_model())
    started = time.time()
    worker = one_step_worker(broker, names, init, tmp_path / "state")
    try:
        wait_version(tmp_path / "state", 0)
        made = (tmp_path / "state" / "shard-0" / checkpoint.model_file(0)).stat().st_mtime
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _version_time() != made:
            time.sleep(0.05)
        assert _version_time() == made and made >= started - 1
    finally:
        worker.stop.set()
        worker.join(30)


def _version_time() -> float | None:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("fedq_model_version_timestamp_seconds", {"shard": "0"})


def test_the_leader_exports_the_updates_waiting_for_a_version(tmp_path: Path) -> None:
    # The walk of 2026-11-29: fewer clients than --buffer-size never make a version; `fedq status` shows why.
    broker, names = memory_broker(1)
    x0 = small_model()
    init = write_init(tmp_path, x0)
    strategy = FedBuff(buffer_size=3, server_lr=1.0, staleness="constant")
    worker = Worker(f"memory://aggregator@{broker}", settings(names, strategy, init, tmp_path / "state"))
    try:
        with connect(f"memory://alice@{broker}") as alice, connect(f"memory://bob@{broker}") as bob:
            send_update(alice, names, delta_for(0, x0), shards=1, update_id="a", base_version=0)
            send_update(bob, names, delta_for(1, x0), shards=1, update_id="b", base_version=0)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and metrics.UPDATES_WAITING._value.get() != 2:
            time.sleep(0.05)
        assert metrics.UPDATES_WAITING._value.get() == 2  # two of the three a version takes
    finally:
        worker.stop.set()
        worker.join(30)

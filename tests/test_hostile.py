"""One client cannot hurt the federation (issue 12): the findings of the hostile-client review, replayed
against a live aggregator on the real broker with per-client users made by ``add_client`` (a valid
``user_id``, nothing but the client's own messages). Where the honest level is a pure decision (admission,
strategies, state), the test is in test_admission.py."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika.data
import pytest
import torch

from fedq import metrics, wire
from fedq.aggregation.server_opt import STATE_PREFIX, ServerOptConfig
from fedq.aggregation.service import Aggregator, Settings
from fedq.aggregation.strategies import FedAvg, FedBuff, Strategy
from fedq.broker import Management, add_client, management_url_for
from fedq.cli.aggregator import max_message_bytes
from fedq.codecs import get_codec
from fedq.errors import TransportError
from fedq.metrics import current_rss_bytes
from fedq.protocol import UpdateMeta
from fedq.safetensors import save_file
from fedq.streaming import iter_container, shard_of
from fedq.topology import DEFAULT_CHUNK_BYTES, DELIVERY_LIMIT, Names
from fedq.transport import Transport, connect
from fedq.transport.base import REASON_HEADER, USER_HEADER
from tests.aggregation_helpers import (
    assert_close,
    delta_for,
    model_of,
    send_update,
    small_model,
    state,
    wait_version,
)
from tests.test_broker_security import client_url

pytestmark = pytest.mark.broker


def messages(
    tensors: dict[str, torch.Tensor],
    update_id: str,
    *,
    stream: str | None = None,
    base: int = 0,
    num_samples: int = 1,
    chunk_bytes: int = 4096,
) -> list[bytes]:
    meta = UpdateMeta(update_id, base, num_samples).to_meta()
    return list(
        iter_container(
            tensors,
            stream=stream or f"s/{update_id}",
            meta=meta,
            codec_for=lambda n, t: get_codec("fp32"),
            chunk_bytes=chunk_bytes,
        )
    )


def publish(t: Transport, names: Names, bodies: list[bytes], headers: dict[str, Any] | None = None) -> None:
    for body in bodies:
        t.publish(names.updates_exchange, names.shard_key(0), body, headers=headers)
    t.flush()


class Running:
    """A live aggregator on the real broker, in a thread, with its transport in reach (reconnect count)."""

    def __init__(self, url: str, config: Settings) -> None:
        self.transport = connect(url, role="aggregator")
        self.aggregator = Aggregator(self.transport, config)
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.aggregator.run(self.stop)
        except BaseException as exc:
            self.error = exc

    def alive(self) -> bool:
        return self.thread.is_alive() and self.error is None

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)
        self.transport.close()
        if self.error is not None:
            raise self.error


@pytest.fixture
def federation(
    tmp_path: Path, amqp_url: str, management: Management, vhost: str, names: Names
) -> Iterator[dict[str, Any]]:
    """The topology and four enrolled clients: alice and bob honest, mallory and eve hostile."""
    with connect(amqp_url) as operator:
        operator.declare(names, 1)
    urls = {}
    for who in ("alice", "bob", "mallory", "eve"):
        user = f"{names.namespace}-{who}"
        add_client(management, user, f"{who}-pw", namespace=names.namespace, vhost=vhost)
        urls[who] = client_url(amqp_url, user, f"{who}-pw")
    yield {"urls": urls, "amqp_url": amqp_url, "names": names, "tmp": tmp_path}


def start(fed: dict[str, Any], strategy: Strategy, model: dict[str, torch.Tensor], **options: Any) -> Running:
    init = save_file(model, fed["tmp"] / "init.safetensors")
    config = Settings(
        names=fed["names"], strategy=strategy, init=init, state_dir=fed["tmp"] / "state", **options
    )
    return Running(fed["amqp_url"], config)


def dead_letters(amqp_url: str, names: Names, wait: float = 1.0) -> list[tuple[str, str]]:
    """(reason, sender) of every dead letter so far."""
    out = []
    with connect(amqp_url) as t:
        t.consume(names.dead_letter_queue, prefetch=500)
        while (d := t.get(wait)) is not None:
            out.append((str(d.headers[REASON_HEADER]), str(d.headers.get(USER_HEADER, ""))))
            t.ack(d)
    return out


def _rejected(reason: str) -> float:
    return sum(
        s.value
        for f in metrics.REJECTED.collect()
        for s in f.samples
        if s.name.endswith("_total") and s.labels == {"role": "aggregator", "reason": reason}
    )


def fedbuff(k: int, **options: Any) -> FedBuff:
    return FedBuff(buffer_size=k, server_lr=1.0, staleness="constant", **options)


def test_findings_1_5_6_no_message_touches_another_clients(federation: dict[str, Any]) -> None:
    """Alice's complete update survives mallory's bad manifest on alice's stream id (finding 5) and alice's
    own bad manifest after completing it (finding 1: it used to delete the staged file and crash-loop the
    aggregator); mallory's squatted stream id and update id (finding 6) do not refuse bob's update."""
    fed, names = federation, federation["names"]
    x0 = small_model()
    a, b = delta_for(1, x0), delta_for(2, x0)
    worker = start(fed, fedbuff(2), x0)
    bad_manifest = messages({"nope": torch.ones(3)}, "a", stream="s/a")[0]
    try:
        with connect(fed["urls"]["alice"]) as alice, connect(fed["urls"]["mallory"]) as mallory:
            publish(alice, names, messages(a, "a"))
            publish(mallory, names, [bad_manifest])  # alice's stream id, mallory's user: her own stream
            publish(alice, names, [bad_manifest])  # alice's own complete stream: refused alone
            publish(mallory, names, messages(b, "b")[:1])  # squats bob's stream id (incomplete: never folds)
            with connect(fed["urls"]["bob"]) as bob:
                publish(bob, names, messages(b, "b"))
        wait_version(fed["tmp"] / "state", 1, timeout=30)
        assert worker.alive()
    finally:
        worker.close()
    assert_close(model_of(fed["tmp"] / "state"), {n: x0[n] + (a[n] + b[n]) / 2 for n in x0})
    reasons = sorted(r for r, _ in dead_letters(fed["amqp_url"], names))
    assert reasons == ["manifest_mismatch", "unknown_tensor"]


def test_batches_are_settled_whole_and_reach_only_their_senders_stream(federation: dict[str, Any]) -> None:
    """Packed updates (wire format version 2) fold like unpacked ones; a batch that carries another stream's
    message or a bad part is dead-lettered whole; a batch whose last part contradicts the stream it completes
    is dead-lettered while the stream it completed folds (its parts count as if each came alone)."""
    fed, names = federation, federation["names"]
    x0 = small_model()
    a, b = delta_for(1, x0), delta_for(2, x0)
    worker = start(fed, fedbuff(2), x0)
    alice_parts = messages(a, "a")
    bob_parts = messages(b, "b")
    foreign = wire.encode_batch("s/m", [*messages(b, "m")[:2], bob_parts[1]])
    broken = wire.encode_batch("s/m2", [*messages(b, "m2")[:2], b"FEDQ\x01junk"])
    finer = iter_container(
        b, stream="s/b", meta={}, codec_for=lambda n, t: get_codec("fp32"), chunk_bytes=256
    )
    stray = list(finer)[-2]  # a chunk index bob's complete stream does not have: a change to it
    assert wire.decode(stray).index >= len(bob_parts) - 2
    try:
        with connect(fed["urls"]["mallory"]) as mallory:
            publish(mallory, names, [foreign, broken])
        with connect(fed["urls"]["alice"]) as alice:
            publish(
                alice,
                names,
                [wire.encode_batch("s/a", alice_parts[:3]), wire.encode_batch("s/a", alice_parts[3:])],
            )
        with connect(fed["urls"]["bob"]) as bob:
            publish(bob, names, [wire.encode_batch("s/b", [*bob_parts, stray])])
        wait_version(fed["tmp"] / "state", 1, timeout=30)
        assert worker.alive()
    finally:
        worker.close()
    assert_close(model_of(fed["tmp"] / "state"), {n: x0[n] + (a[n] + b[n]) / 2 for n in x0})
    reasons = sorted(r for r, _ in dead_letters(fed["amqp_url"], names))
    assert reasons == ["bad_flags", "bad_header", "stream_complete"]


class Raw:
    """A header value written as raw AMQP field bytes (pika cannot write a double, nor a timestamp of 2^62 s):
    the test's publisher gets a patched encoder while it publishes; the aggregator's decoder is pika's own."""

    def __init__(self, field: bytes) -> None:
        self.field = field


@contextlib.contextmanager
def raw_header_encoding() -> Iterator[None]:
    original = pika.data.encode_value

    def encode_value(pieces: list[bytes], value: Any) -> int:
        if isinstance(value, Raw):
            pieces.append(value.field)
            return len(value.field)
        return original(pieces, value)

    pika.data.encode_value = encode_value
    try:
        yield
    finally:
        pika.data.encode_value = original


def test_findings_2_3_poison_headers_never_stop_the_aggregator(federation: dict[str, Any]) -> None:
    """A double of 1e300 (pika decodes it as a 300-digit int it cannot encode again: the dead letter used to
    kill the I/O thread and hang) and timestamps of 2^62 and 2^63 s (pika could not decode the frame: 694
    reconnects in 70 s) are dead-lettered once each, without their headers; the version still comes."""
    fed, names = federation, federation["names"]
    x0 = small_model()
    worker = start(fed, fedbuff(1), x0)
    # (a double of inf or NaN never gets this far: the broker closes the publisher's connection, 541)
    poison = [
        struct.pack(">cd", b"d", 1e300),
        struct.pack(">cQ", b"T", 2**62),
        struct.pack(">cQ", b"T", 2**63),
    ]
    try:
        with raw_header_encoding(), connect(fed["urls"]["mallory"]) as mallory:
            for field in poison:
                publish(mallory, names, [b"junk"], headers={"x": Raw(field)})
        with connect(fed["urls"]["bob"]) as bob:
            publish(bob, names, messages(delta_for(2, x0), "b"))
        wait_version(fed["tmp"] / "state", 1, timeout=30)
        assert worker.alive() and worker.transport.reconnects == 0
    finally:
        worker.close()
    dead = dead_letters(fed["amqp_url"], names)
    assert len(dead) == 3 and {r for r, _ in dead} == {"truncated"}
    assert {u for _, u in dead} == {f"{names.namespace}-mallory"}


def test_a_quorum_update_queue_dead_letters_a_poison_message_after_its_delivery_limit(
    amqp_url: str, names: Names
) -> None:
    """A message whose every delivery ends its consumer unacked (a crash, a closed connection: returned to the
    queue) is dead-lettered by the broker after ``DELIVERY_LIMIT`` deliveries (quorum queues: the
    ``--quorum`` topology), instead of coming back for ever."""
    with connect(amqp_url) as operator:
        operator.declare(names, 1, quorum=True)
        operator.publish(names.updates_exchange, names.shard_key(0), b"poison", persistent=True)
        operator.flush()
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        deliveries = 0
        while (got := channel.basic_get(names.updates_queue(0)))[0] is not None:
            deliveries += 1
            assert deliveries <= DELIVERY_LIMIT + 1, "redelivered beyond the limit"
            channel.basic_nack(got[0].delivery_tag, requeue=True)
        deadline = time.monotonic() + 10
        while (dead := channel.basic_get(names.dead_letter_queue, auto_ack=True))[0] is None:
            assert time.monotonic() < deadline, "not dead-lettered"
            time.sleep(0.05)
    finally:
        connection.close()
    assert deliveries == DELIVERY_LIMIT + 1
    _, properties, body = dead
    assert body == b"poison"
    assert properties.headers["x-death"][0]["reason"] == "delivery_limit"


def test_finding_4_a_non_finite_fold_is_never_published(federation: dict[str, Any]) -> None:
    """Two finite updates of 2e38 per element sum to +Inf (FedBuff, no norm bound): the fold is checked, the
    model restored, the update that moves it most refused (``nonfinite_result``), and the version is made
    from what holds. In a float16 model, 1e5 (beyond 65504) is refused the same way."""
    fed, names = federation, federation["names"]
    x0 = {n: t.half() for n, t in small_model().items()}
    huge = {n: torch.full(t.shape, 2e38) for n, t in x0.items()}
    beyond_fp16 = {n: torch.full(t.shape, 2e5) for n, t in x0.items()}  # half of it is beyond 65504
    b = delta_for(2, small_model())
    refused = _rejected("nonfinite_result")
    worker = start(fed, fedbuff(2), x0)
    try:
        with connect(fed["urls"]["mallory"]) as mallory, connect(fed["urls"]["alice"]) as alice:
            publish(mallory, names, messages(huge, "m1"))
            publish(alice, names, messages(huge, "a1"))
            publish(mallory, names, messages(beyond_fp16, "m2"))
        with connect(fed["urls"]["bob"]) as bob:
            publish(bob, names, messages(b, "b"))
            publish(bob, names, messages(b, "b2"))
        wait_version(fed["tmp"] / "state", 1, timeout=30)
        assert worker.alive()
    finally:
        worker.close()
    model = model_of(fed["tmp"] / "state")
    assert all(bool(torch.isfinite(t).all()) and float(t.abs().max()) <= 65504 for t in model.values())
    assert_close(model, {n: x0[n].float() + b[n] for n in x0})  # m1, a1 and m2 refused; b and b2 folded
    assert _rejected("nonfinite_result") - refused == 3  # at plan time: counted and logged (acked before)
    assert state(fed["tmp"] / "state")["version"] == 1


def _wait(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout} s")
        time.sleep(0.05)


def _leader(worker: Running) -> Any:
    """The leader a started aggregator plans with (an aborted plan replaces it)."""
    _wait(lambda: worker.aggregator.leader is not None, 30, "the aggregator's start")
    return worker.aggregator.leader


def test_a_followers_refused_fold_is_refused_on_every_shard_and_the_version_comes(
    federation: dict[str, Any],
) -> None:
    """Two shards, a float16 model, FedAvgM on the server: mallory's update is 50 on shard 0's tensors (the
    leader's fold of it holds, and moves the momentum) and 2e5 on shard 1's (beyond 65504: the follower's fold
    does not). The follower says so; the leader aborts the plan on every shard (its own fold and momentum
    restored), refuses mallory's update, and makes version 1 from alice's and bob's: the same on both shards,
    announced, the momentum that of the honest step alone. (It used to stall: the follower refused the plan
    and the leader waited for its "stepped" for ever.)"""
    fed, names = federation, federation["names"]
    x0 = {n: t.half() for n, t in small_model().items()}
    on = shard_of({n: 4 * t.numel() for n, t in x0.items()}, 2)
    assert set(on.values()) == {0, 1}
    m = {n: torch.full(t.shape, 50.0 if on[n] == 0 else 2e5) for n, t in x0.items()}
    a, b = delta_for(1, small_model()), delta_for(2, small_model())
    init = save_file(x0, fed["tmp"] / "init.safetensors")
    with connect(fed["amqp_url"]) as operator:
        operator.declare(names, 2)  # `fedq broker apply --shards 2`: the fixture declared one shard
    workers = [
        Running(
            fed["amqp_url"],
            Settings(
                names=names,
                strategy=fedbuff(2),
                init=init,
                state_dir=fed["tmp"] / "state",
                shard=shard,
                shards=2,
                server_opt=ServerOptConfig("avgm"),
            ),
        )
        for shard in (0, 1)
    ]
    refused = _rejected("nonfinite_result")
    try:
        leader = _leader(workers[0])  # before the updates: the abort may come before they are sent
        with connect(fed["urls"]["mallory"]) as mallory, connect(fed["urls"]["alice"]) as alice:
            send_update(mallory, names, m, shards=2, update_id="m", base_version=0)
            time.sleep(0.5)  # mallory's completes first: the first plan is {m, a}
            send_update(alice, names, a, shards=2, update_id="a", base_version=0)
        _wait(lambda: bool(leader is not workers[0].aggregator.leader), 30, "the plan's abort")
        assert [reason for _, reason in workers[0].aggregator.leader.drops] == ["nonfinite_result"]
        with connect(fed["urls"]["bob"]) as bob:
            send_update(bob, names, b, shards=2, update_id="b", base_version=0)
        wait_version(fed["tmp"] / "state", 1, timeout=30, shards=2)
        assert all(w.alive() for w in workers)
    finally:
        for w in workers:
            w.close()
    step = {n: (a[n] + b[n]) / 2 for n in x0}
    assert_close(model_of(fed["tmp"] / "state", 2), {n: x0[n].float() + step[n] for n in x0})
    momentum = model_of(fed["tmp"] / "state", 2, prefix=STATE_PREFIX)
    assert_close(momentum, {f"{STATE_PREFIX}m/{n}": step[n].reshape(-1) for n in x0})
    assert state(fed["tmp"] / "state")["announced"] == 1
    assert state(fed["tmp"] / "state", 1)["version"] == 1
    assert _rejected("nonfinite_result") - refused == 2  # dropped by version 1's plan: counted by each shard


def test_a_refused_fold_leaves_the_server_optimizers_state(federation: dict[str, Any]) -> None:
    """One shard, FedAvgM, one fold thread: mallory's update is 50 on every tensor but the last (those windows
    fold, and move the momentum) and 2e5 on the last (beyond float16: refused). The model and the momentum go
    back to version 0's (restoring used to end the process: the checkpoint's optimizer tensors are not model
    tensors), and version 1 is the honest step alone."""
    fed, names = federation, federation["names"]
    x0 = {n: t.half() for n, t in small_model().items()}
    last = list(x0)[-1]
    m = {n: torch.full(t.shape, 2e5 if n == last else 50.0) for n, t in x0.items()}
    a, b = delta_for(1, small_model()), delta_for(2, small_model())
    worker = start(fed, fedbuff(2), x0, server_opt=ServerOptConfig("avgm"), fold_threads=1)
    try:
        leader = _leader(worker)  # before the updates: the abort may come before they are sent
        with connect(fed["urls"]["mallory"]) as mallory, connect(fed["urls"]["alice"]) as alice:
            publish(mallory, names, messages(m, "m"))
            time.sleep(0.5)
            publish(alice, names, messages(a, "a"))
        _wait(lambda: bool(leader is not worker.aggregator.leader), 30, "the plan's abort")
        with connect(fed["urls"]["bob"]) as bob:
            publish(bob, names, messages(b, "b"))
        wait_version(fed["tmp"] / "state", 1, timeout=30)
        assert worker.alive()
    finally:
        worker.close()
    step = {n: (a[n] + b[n]) / 2 for n in x0}
    assert_close(model_of(fed["tmp"] / "state"), {n: x0[n].float() + step[n] for n in x0})
    momentum = model_of(fed["tmp"] / "state", prefix=STATE_PREFIX)
    assert_close(momentum, {f"{STATE_PREFIX}m/{n}": step[n].reshape(-1) for n in x0})


def test_findings_7_8_samples_cap_share_limit_and_empty_updates(federation: dict[str, Any]) -> None:
    """num_samples of 2^63-1 is refused (cap); at the cap, mallory's share of FedAvg is limited to 0.5; an
    update without tensors is refused (it used to erase everyone's under FedAvg with a huge num_samples)."""
    fed, names = federation, federation["names"]
    x0 = small_model()
    m, b = delta_for(3, x0), delta_for(2, x0)
    worker = start(fed, FedAvg(min_clients=2, round_timeout=60), x0, max_share=0.5)
    empty = list(iter_container({}, stream="s/e", meta=UpdateMeta("e", 0, 10**6).to_meta()))
    try:
        with connect(fed["urls"]["mallory"]) as mallory:
            publish(mallory, names, messages(m, "huge", num_samples=2**63 - 1))
            publish(mallory, names, empty)
            publish(mallory, names, messages(m, "m", num_samples=10**6))
        with connect(fed["urls"]["bob"]) as bob:
            publish(bob, names, messages(b, "b", num_samples=100))
        wait_version(fed["tmp"] / "state", 1, timeout=30)
    finally:
        worker.close()
    assert_close(model_of(fed["tmp"] / "state"), {n: x0[n] + 0.5 * m[n] + 0.5 * b[n] for n in x0}, tol=1e-5)
    reasons = sorted(r for r, _ in dead_letters(fed["amqp_url"], names))
    assert reasons == ["empty_update", "too_many_samples"]


def test_finding_9_junk_behind_an_honest_update_does_not_hold_its_version(federation: dict[str, Any]) -> None:
    """5,000 junk messages queued right behind bob's update: the version comes within seconds (it used to wait
    for the whole flood: 13.7 s for 10,000), and every junk message is dead-lettered (pipelined)."""
    fed, names = federation, federation["names"]
    x0 = small_model()
    worker = start(fed, fedbuff(1), x0)
    try:
        with connect(fed["urls"]["bob"]) as bob, connect(fed["urls"]["mallory"]) as mallory:
            publish(bob, names, messages(delta_for(2, x0), "b"))
            started = time.monotonic()
            publish(mallory, names, [b"junk %d" % i for i in range(5000)])
        wait_version(fed["tmp"] / "state", 1, timeout=30)
        took = time.monotonic() - started
        deadline = time.monotonic() + 60
        while (
            len(dead := dead_letters(fed["amqp_url"], names, wait=0.5)) < 5000 and time.monotonic() < deadline
        ):
            pass
        assert worker.alive()
    finally:
        worker.close()
    print(f"\nversion {took:.2f} s after 5,000 junk messages were queued behind its update")
    assert took < 5.0
    del dead


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 128 MiB tmpfs: a state directory whose disk a client's default quota exceeds (root only)."""
    where = tmp_path / "disk"
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128m", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_clients_incomplete_streams_never_fill_the_state_directory(
    federation: dict[str, Any], small_disk: Path
) -> None:
    """Staging leaves the state directory its reserve (the next checkpoint + 64 MiB), and no user holds more
    than half of the room above it: on a 128 MiB disk (about 56 MiB of room), mallory opens 16 incomplete
    streams of 4 MiB (64 MiB, within her default quota of 4 x the model + 64 MiB); what she sends beyond
    half the room is refused (``quota_room``), the disk never fills, alice's update is staged and makes the
    version.
    Walked on a 160 MiB tmpfs (docs/security.md), such streams filled the directory in 1.2 s and the shard
    stopped (``NoSpaceError``, exit 4) for everyone."""
    fed, names = federation, federation["names"]
    x0 = {"w": torch.zeros(1 << 20)}
    init = save_file(x0, fed["tmp"] / "init.safetensors")
    state_dir = small_disk / "state"
    worker = Running(
        fed["amqp_url"], Settings(names=names, strategy=fedbuff(1), init=init, state_dir=state_dir)
    )
    g = torch.Generator().manual_seed(0)
    hostile = [
        messages({"w": torch.randn(1 << 20, generator=g)}, f"m{i}", chunk_bytes=1 << 20)[:-1]
        for i in range(16)
    ]
    a = {"w": 0.01 * torch.randn(1 << 20, generator=g)}
    refused = _rejected("quota_room")
    try:
        room = shutil.disk_usage(small_disk).free - worker.aggregator.reserve
        with connect(fed["urls"]["mallory"]) as mallory:
            for stream in hostile:
                publish(mallory, names, stream)
        staging = worker.aggregator.staging
        _wait(
            lambda: (
                _rejected("quota_room") - refused + sum(len(s.chunks) for s in staging.streams.values()) == 64
            ),
            30,
            "mallory's 64 chunks staged or refused",
        )
        staged = staging.usage(f"{names.namespace}-mallory")[1]
        least_free = shutil.disk_usage(small_disk).free
        with connect(fed["urls"]["alice"]) as alice:
            publish(alice, names, messages(a, "a", chunk_bytes=1 << 20))
        wait_version(state_dir, 1, timeout=30)
        assert worker.alive()
    finally:
        worker.close()
    print(f"\nroom {room >> 20} MiB: mallory staged {staged >> 20} MiB, {least_free >> 20} MiB left free")
    assert room // 2 - (5 << 20) <= staged <= room // 2
    assert least_free >= worker.aggregator.reserve
    assert_close(model_of(state_dir), {"w": a["w"]})
    senders = {s for r, s in dead_letters(fed["amqp_url"], names) if r == "quota_room"}
    assert senders == {f"{names.namespace}-mallory"}


def test_a_stream_of_tiny_chunks_is_held_to_the_message_quota(federation: dict[str, Any]) -> None:
    """Each staged message is an entry of the staging index in memory (~525 bytes, whatever its size), so a
    user's staged messages are bounded too: mallory's one-element chunks (4,096 of them, 0.6 MiB, far within
    her byte quota) are staged up to her message quota (her byte quota / 64 KiB: 1,025), the rest refused
    (``quota_messages``); alice's update makes the version."""
    fed, names = federation, federation["names"]
    x0 = {"w": torch.zeros(4096)}
    worker = start(fed, fedbuff(1), x0)
    tiny = messages({"w": torch.randn(4096)}, "m", chunk_bytes=4)
    a = {"w": torch.full((4096,), 0.01)}
    refused = _rejected("quota_messages")
    try:
        with connect(fed["urls"]["mallory"]) as mallory:
            publish(mallory, names, tiny)
        most = worker.aggregator.quota.messages
        _wait(lambda: _rejected("quota_messages") - refused == len(tiny) - most, 60, "mallory refused")
        staged = worker.aggregator.staging.usage(f"{names.namespace}-mallory")
        with connect(fed["urls"]["alice"]) as alice:
            publish(alice, names, messages(a, "a"))
        wait_version(fed["tmp"] / "state", 1, timeout=30)
        assert worker.alive()
    finally:
        worker.close()
    assert most == (4 * 4 * 4096 + (64 << 20)) // (64 << 10) == staged[2]
    assert_close(model_of(fed["tmp"] / "state"), a)
    senders = {s for r, s in dead_letters(fed["amqp_url"], names) if r == "quota_messages"}
    assert senders == {f"{names.namespace}-mallory"}


def test_finding_12_a_client_can_bind_nothing(federation: dict[str, Any]) -> None:
    """Exchange-to-exchange bindings from the models/versions exchanges into the updates exchange (1,000 made
    in 1.1 s before) are refused: the exchanges are named apart from the streams a client may read."""
    fed, names = federation, federation["names"]
    params = pika.URLParameters(fed["urls"]["mallory"])
    for source in (names.models_exchange, f"{names.namespace}.versions.in", names.dead_letter_exchange):
        connection = pika.BlockingConnection(params)
        try:
            with pytest.raises(pika.exceptions.ChannelClosedByBroker) as excinfo:
                connection.channel().exchange_bind(names.updates_exchange, source)
            assert excinfo.value.reply_code == 403
        finally:
            if connection.is_open:
                connection.close()


def _refused_on_a_channel(url: str, act: Any) -> int:
    """The reply code of the channel close that ``act(channel)`` provokes (pika raises it)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()  # a refused publish surfaces here, not later
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as excinfo:
            act(channel)
        return int(excinfo.value.reply_code)
    finally:
        if connection.is_open:
            connection.close()


def test_finding_12_a_client_reads_nothing_but_the_model_and_version_streams(
    federation: dict[str, Any],
) -> None:
    """What a client user (``add_client``'s permissions: configure ``^$``, write the updates exchange, read
    the two streams) can do to the aggregator's queues (updates, control, dead letters): get, consume, purge,
    delete, publish into them by the default exchange, bind: each refused (403); the management API: refused
    (401, the user has no management tag). What remains: a passive ``queue.declare``, for which RabbitMQ
    checks no permission, answers a queue's depth and consumer count (never a message)."""
    fed, names = federation, federation["names"]
    url = fed["urls"]["mallory"]
    private = [names.updates_queue(0), names.control_queue(0), names.dead_letter_queue]
    acts = {
        "get": lambda q: lambda ch: ch.basic_get(q),
        "consume": lambda q: lambda ch: ch.basic_consume(q, lambda *a: None),
        "purge": lambda q: lambda ch: ch.queue_purge(q),
        "delete": lambda q: lambda ch: ch.queue_delete(q),
        "publish": lambda q: lambda ch: ch.basic_publish("", q, b"x", mandatory=True),
        "bind": lambda q: lambda ch: ch.queue_bind(q, names.updates_exchange, "x"),
    }
    codes = {(act, q): _refused_on_a_channel(url, make(q)) for act, make in acts.items() for q in private}
    assert set(codes.values()) == {403}, codes
    api = Management(management_url_for(url))  # the management API with mallory's own credentials
    for path in ("/overview", "/queues", f"/queues/%2F/{names.updates_queue(0)}", "/definitions"):
        with pytest.raises(TransportError) as excinfo:
            api.get(path)
        assert excinfo.value.reason == "http_401"
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:  # the one leak: counts, by name, of any queue of the vhost
        answer = connection.channel().queue_declare(names.updates_queue(0), passive=True)
        assert (answer.method.message_count, answer.method.consumer_count) == (0, 0)
    finally:
        connection.close()


BUDGET = 32 << 20  # the aggregator's --memory-budget in the flood below
JUNK = 24  # largest junk messages in the flood, 6 between each two of the 4 valid updates
# Above the budget: the dead-letter copies' publish window (a quarter of the budget), 6 largest messages
# (the one being handled: received, staged copy, decoded check; and what the allocator keeps of freed ones),
# and 16 MiB of glibc's heap: codec outputs under 32 MiB come from malloc since 7896293 (a repeated decode
# reuses memory already faulted in), and the heap keeps freed blocks below its trim threshold. Measured on
# 2026-11-28: growth 48-60 MiB before that change, 67-75 MiB after, and 74-75 MiB with 3x the flood (flat:
# a fixed overhead, not one that grows with what a client sends).
FLOOD_OVERHEAD = BUDGET // 4 + 6 * max_message_bytes(DEFAULT_CHUNK_BYTES) + (16 << 20)


def _rss(pid: int) -> int:
    """A process's resident set (VmRSS), in bytes; 0 once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return int(next(line.split()[1] for line in text.splitlines() if line.startswith("VmRSS:"))) << 10


@pytest.mark.slow
def test_finding_10_a_flood_of_largest_messages_stays_within_the_memory_budget(
    federation: dict[str, Any],
) -> None:
    """Intake is bounded in bytes: the aggregator (a process of its own, ``--memory-budget 32MiB``) prefetches
    what the budget leaves after the chunks held for the fold (8 MiB) / the largest message the broker accepts
    (``max_message_size`` in broker_config/rabbitmq.conf, 5 MiB for 4 MiB chunks: 4 deliveries). Mallory
    floods it with 24 junk messages of exactly that size (refused and dead-lettered, body and all) and 4
    valid updates of 4 MiB chunks (staged to disk; too large to be held): its
    resident set grows by at most the budget plus a fixed overhead (``FLOOD_OVERHEAD``, 54 MiB). It used to
    prefetch a message count: five 100 MiB messages took it from 237 to 788 MiB against a budget of 64 MiB;
    16 of these would be 80 MiB in flight."""
    fed, names = federation, federation["names"]
    conf = (Path(__file__).parent.parent / "broker_config" / "rabbitmq.conf").read_text()
    size = max_message_bytes(DEFAULT_CHUNK_BYTES)
    assert f"max_message_size = {size}" in conf
    x0 = {"w": torch.zeros(4 << 20)}  # 16 MiB: one 4 MiB chunk is the largest valid message
    init = save_file(x0, fed["tmp"] / "init.safetensors")
    log = fed["tmp"] / "aggregator.log"
    command = [
        *("-m", "workers.aggregator", "--amqp-url", fed["amqp_url"], "--namespace", names.namespace),
        *("--strategy", "fedbuff", "--buffer-size", "100", "--init", str(init)),
        *("--state-dir", str(fed["tmp"] / "state"), "--device", "cpu", "--memory-budget", str(BUDGET)),
    ]
    rng = random.Random(10)
    junk = [rng.randbytes(size) for _ in range(JUNK)]
    updates = [
        list(
            iter_container(
                {"w": torch.full((4 << 20,), float(i))},
                stream=f"s/flood{i}",
                meta=UpdateMeta(f"flood{i}", 0, 1).to_meta(),
                codec_for=lambda n, t: get_codec("fp32"),
                chunk_bytes=DEFAULT_CHUNK_BYTES,
            )
        )
        for i in range(4)
    ]
    assert max(len(b) for u in updates for b in u) <= size
    with open(log, "wb") as out:
        worker = subprocess.Popen(
            [sys.executable, *command], stdout=out, stderr=subprocess.STDOUT, cwd=Path(__file__).parent.parent
        )
    peak, samples, stop = [0], [], threading.Event()
    try:
        _wait(lambda: "version 0 from" in log.read_text(), 60, "the aggregator's start")
        time.sleep(1.0)
        baseline = _rss(worker.pid)

        def sample() -> None:
            while not stop.is_set():
                samples.append(_rss(worker.pid))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        with connect(fed["urls"]["mallory"]) as mallory:
            for i, update in enumerate(updates):
                publish(mallory, names, junk[i * JUNK // 4 : (i + 1) * JUNK // 4])
                publish(mallory, names, update)
        _wait(lambda: log.read_text().count(" complete (base version") == 4, 120, "the 4 updates staged")
        _wait(lambda: log.read_text().count("refused a message from") == JUNK, 60, "the junk refused")
        stop.set()
        sampler.join(5)
        peak[0] = max(samples)
        assert worker.poll() is None, log.read_text()[-2000:]
    finally:
        stop.set()
        worker.terminate()
        worker.wait(30)
    reasons = Counter(r for r, _ in dead_letters(fed["amqp_url"], names))
    assert sum(reasons.values()) == JUNK, reasons
    growth = peak[0] - baseline
    print(
        f"\nflood: {JUNK} x {size >> 20} MiB junk + 16 x 4 MiB chunks; aggregator RSS "
        f"{baseline >> 20} MiB -> peak {peak[0] >> 20} MiB (growth {growth >> 20} MiB; budget "
        f"{BUDGET >> 20} MiB + overhead {FLOOD_OVERHEAD >> 20} MiB; {len(samples)} samples)"
    )
    assert growth <= BUDGET + FLOOD_OVERHEAD


# ----------------------------------------------------------------------------------------------------------
# The randomised adversary: two hostile clients interleave invalid and hostile messages with honest clients
# ----------------------------------------------------------------------------------------------------------
ROUNDS = 4
HOSTILE_PER_ROUND = 400


def _attacks(rng: random.Random, x0: dict[str, torch.Tensor], honest: list[bytes], n: int) -> Iterator[Any]:
    """(class, bodies, headers) of one hostile act; none of them may change the honest-only model."""
    delta = delta_for(rng.randrange(10**6), x0)
    uid = f"h{rng.randrange(10**9)}"
    kind = rng.choice(
        [
            "junk",
            "bit_flip",
            "foreign_stream_manifest",
            "partial_replay",
            "samples_claim",
            "empty_update",
            "wrong_shape",
            "future_base",
            "poison_header",
            "complete_stream_manifest",
        ]
    )
    headers = None
    if kind == "junk":
        bodies = [rng.randbytes(rng.randrange(1, 2048))]
    elif kind == "bit_flip":
        body = bytearray(rng.choice(honest))
        body[rng.randrange(len(body))] ^= 1 << rng.randrange(8)
        bodies = [bytes(body)]
    elif kind == "foreign_stream_manifest":  # names an honest client's stream id
        bodies = [messages({"nope": torch.ones(3)}, uid, stream=f"s/a{n}")[0]]
    elif kind == "partial_replay":  # an honest update's bytes without its commit: never completes, expires
        bodies = honest[: rng.randrange(1, len(honest))]
    elif kind == "samples_claim":
        bodies = messages(delta, uid, num_samples=2**62)
    elif kind == "empty_update":
        bodies = list(iter_container({}, stream=f"s/{uid}", meta=UpdateMeta(uid, 0).to_meta()))
    elif kind == "wrong_shape":
        bodies = messages({"head": torch.ones(3, 3)}, uid)
    elif kind == "future_base":
        bodies = messages(delta, uid, base=10**6)
    elif kind == "poison_header":
        bodies = [b"junk"]
        headers = {"x": Raw(rng.choice([struct.pack(">cd", b"d", 1e300), struct.pack(">cQ", b"T", 2**62)]))}
    else:  # a stream of its own, then a contradicting manifest on it: refused alone
        bodies = [*messages(delta, uid)[:-1], messages({"w": torch.ones(2)}, uid)[0]]
    yield kind, bodies, headers


def test_randomised_adversaries_leave_the_honest_model(federation: dict[str, Any]) -> None:
    """Seeded random sequences: mallory and eve interleave junk, malformed, hostile and poison messages with
    alice's and bob's honest updates, round after round. The model is the honest-only model within 1e-6, the
    aggregator stays up within its memory (RSS growth bounded), and every round gives a version."""
    fed, names = federation, federation["names"]
    rng = random.Random(20261127)
    x0 = small_model()
    worker = start(fed, fedbuff(2, distinct_clients=True), x0, max_streams_per_user=64)
    tried: Counter[str] = Counter()
    honest_sum = {n: torch.zeros_like(t) for n, t in x0.items()}
    rss0, peak = current_rss_bytes(), 0
    started = time.monotonic()
    urls = fed["urls"]
    try:
        with (
            raw_header_encoding(),
            connect(urls["alice"]) as alice,
            connect(urls["bob"]) as bob,
            connect(urls["mallory"]) as mallory,
            connect(fed["urls"]["eve"]) as eve,
        ):
            for r in range(ROUNDS):
                a, b = delta_for(100 + 2 * r, x0), delta_for(101 + 2 * r, x0)
                for n in x0:
                    honest_sum[n] += a[n] + b[n]
                queue = [(alice, body, None) for body in messages(a, f"a{r}", base=r)]
                queue += [(bob, body, None) for body in messages(b, f"b{r}", base=r)]
                honest = messages(a, f"a{r}", stream=f"s/a{r}", base=r)
                for _ in range(HOSTILE_PER_ROUND):
                    for kind, bodies, headers in _attacks(rng, x0, honest, r):
                        tried[kind] += 1
                        sender = rng.choice([mallory, eve])
                        queue += [(sender, body, headers) for body in bodies]
                # shuffle, but keep each honest update's own order (a stream may arrive in any order anyway)
                rng.shuffle(queue)
                for sender, body, headers in queue:
                    sender.publish(names.updates_exchange, names.shard_key(0), body, headers=headers)
                for t in (alice, bob, mallory, eve):
                    t.flush()
                wait_version(fed["tmp"] / "state", r + 1, timeout=60)
                peak = max(peak, current_rss_bytes())
                assert worker.alive(), worker.error
    finally:
        worker.close()
    elapsed = time.monotonic() - started
    expected = {n: x0[n] + honest_sum[n] / 2 for n in x0}
    assert_close(model_of(fed["tmp"] / "state"), expected, tol=1e-6)
    growth = peak - rss0
    print(
        f"\nadversary: {sum(tried.values())} hostile acts in {elapsed:.1f} s, RSS growth {growth >> 20} MiB"
    )
    for kind, count in sorted(tried.items()):
        print(f"  {kind:26s} {count:5d}")
    assert growth < 256 << 20

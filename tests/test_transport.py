"""The transport's promises, checked on the in-memory double and (marked ``broker``) on RabbitMQ itself."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from fedq import metrics
from fedq.broker import Management, apply, q
from fedq.errors import TransportError
from fedq.topology import Names, definitions
from fedq.transport import Delivery, Transport, connect
from fedq.transport.base import DETAIL_HEADER, QUEUE_HEADER, REASON_HEADER
from fedq.transport.memory import MemoryTransport

Factory = Callable[..., Transport]


@pytest.fixture(params=["memory", pytest.param("rabbitmq", marks=pytest.mark.broker)])
def factory(request: pytest.FixtureRequest) -> Iterator[Factory]:
    """Opens transports of one kind, all on the same broker, and closes them after the test."""
    opened: list[Transport] = []
    memory = request.param == "memory"
    url = f"memory://{uuid.uuid4().hex}" if memory else request.getfixturevalue("amqp_url")

    def open_transport(**options: Any) -> Transport:
        transport = connect(url, **options)
        opened.append(transport)
        return transport

    yield open_transport
    for transport in opened:
        with contextlib.suppress(TransportError):
            transport.close()


@pytest.fixture
def ns_names(request: pytest.FixtureRequest, factory: Factory) -> Names:
    """A fresh namespace: cleaned up on the broker by ``namespace``; unique per test on the memory broker."""
    if "rabbitmq" in request.node.callspec.id:
        return Names(request.getfixturevalue("namespace"))
    return Names(f"m{uuid.uuid4().hex[:8]}")


def drain(transport: Transport, timeout: float = 2.0) -> list[Delivery]:
    """Every delivery until none arrives for ``timeout`` seconds, each acked."""
    got = []
    while (delivery := transport.get(timeout)) is not None:
        got.append(delivery)
        transport.ack(delivery)
    return got


def test_round_trip_respects_window_and_loses_nothing(factory: Factory, ns_names: Names) -> None:
    publisher = factory(window_messages=16, window_bytes=1 << 20)
    publisher.declare(ns_names, 2)
    for i in range(600):
        publisher.publish(ns_names.updates_exchange, ns_names.shard_key(i % 2), b"%d" % i + bytes(4000))
    publisher.flush()
    consumer = factory()
    consumer.consume(ns_names.updates_queue(0), prefetch=8)
    consumer.consume(ns_names.updates_queue(1), prefetch=8)
    got = drain(consumer)
    assert sorted(int(d.body[:3].rstrip(b"\0")) for d in got) == list(range(600))
    assert all(d.user_id == "guest" for d in got)
    assert {d.queue for d in got if int(d.body[:3].rstrip(b"\0")) % 2} == {ns_names.updates_queue(1)}
    if not isinstance(publisher, MemoryTransport):  # the double confirms at once; only RabbitMQ has a window
        peak = publisher.peak_in_flight_messages  # type: ignore[attr-defined]
        assert 1 < peak <= 16, "confirms must be pipelined yet bounded by the window"


def test_window_bytes_bound(factory: Factory, ns_names: Names) -> None:
    publisher = factory(window_messages=1000, window_bytes=256 << 10)
    publisher.declare(ns_names, 1)
    for _ in range(100):
        publisher.publish(ns_names.updates_exchange, ns_names.shard_key(0), bytes(60 << 10))
    publisher.flush()
    if not isinstance(publisher, MemoryTransport):
        assert publisher.peak_in_flight_bytes <= 256 << 10  # type: ignore[attr-defined]
        assert publisher.peak_in_flight_messages >= 2  # type: ignore[attr-defined]


def test_prefetch_bounds_unacked_and_cancel_requeues(factory: Factory, ns_names: Names) -> None:
    publisher = factory()
    publisher.declare(ns_names, 1)
    for i in range(10):
        publisher.publish(ns_names.updates_exchange, ns_names.shard_key(0), b"%d" % i)
    publisher.flush()
    consumer = factory()
    tag = consumer.consume(ns_names.updates_queue(0), prefetch=3)
    held = [consumer.get(5.0) for _ in range(3)]
    assert all(held)
    assert consumer.get(0.5) is None, "a fourth delivery while three are unacked breaks prefetch"
    consumer.cancel(tag)
    other = factory()
    other.consume(ns_names.updates_queue(0), prefetch=20)
    again = drain(other)
    assert sorted(int(d.body) for d in again) == list(range(10))
    assert {d.body for d in again if d.redelivered} == {d.body for d in held if d is not None}


def test_dead_letter_carries_reason_while_consuming_goes_on(factory: Factory, ns_names: Names) -> None:
    publisher = factory()
    publisher.declare(ns_names, 1)
    for i in range(20):
        publisher.publish(ns_names.updates_exchange, ns_names.shard_key(0), b"%d" % i, headers={"n": i})
    publisher.flush()
    consumer = factory(role="aggregator")
    consumer.consume(ns_names.updates_queue(0), prefetch=4)
    kept = []
    while (delivery := consumer.get(2.0)) is not None:
        if delivery.headers["n"] in (3, 11):
            consumer.dead_letter(delivery, "checksum", f"message {delivery.headers['n']}")
        else:
            kept.append(delivery.headers["n"])
            consumer.ack(delivery)
    assert sorted(kept) == [i for i in range(20) if i not in (3, 11)]
    consumer.consume(ns_names.dead_letter_queue, prefetch=10)
    dead = drain(consumer)
    assert sorted(int(d.body) for d in dead) == [3, 11]
    for d in dead:
        assert "n" not in d.headers  # a dead letter never carries the sender's (untrusted) headers
        assert d.headers[REASON_HEADER] == "checksum"
        assert d.headers[DETAIL_HEADER] == f"message {int(d.body)}"
        assert d.headers[QUEUE_HEADER] == ns_names.updates_queue(0)


def test_unroutable_message_is_an_error(factory: Factory, ns_names: Names) -> None:
    publisher = factory()
    publisher.declare(ns_names, 1)
    with pytest.raises(TransportError) as excinfo:
        publisher.publish(ns_names.updates_exchange, ns_names.shard_key(7), b"nowhere")
        publisher.flush()
    assert excinfo.value.reason == "unroutable"
    publisher.publish(ns_names.updates_exchange, ns_names.shard_key(0), b"still works")
    publisher.flush()


def test_stream_is_read_from_an_offset(factory: Factory, ns_names: Names) -> None:
    publisher = factory()
    publisher.declare(ns_names, 1)
    for i in range(5):
        publisher.publish(ns_names.models_exchange, "", b"v%d" % i)
    publisher.flush()
    reader = factory()
    reader.consume(ns_names.models_stream, prefetch=2, arguments={"x-stream-offset": "first"})
    first = drain(reader)
    assert [d.body for d in first] == [b"v0", b"v1", b"v2", b"v3", b"v4"]
    offsets = [d.headers["x-stream-offset"] for d in first]
    assert offsets == sorted(offsets)
    late = factory()
    late.consume(ns_names.models_stream, prefetch=2, arguments={"x-stream-offset": offsets[3]})
    assert [d.body for d in drain(late)] == [b"v3", b"v4"]


def test_declare_rejects_a_conflicting_queue(factory: Factory, ns_names: Names) -> None:
    transport = factory()
    transport.declare(ns_names, 1)
    transport.declare(ns_names, 1)  # idempotent
    with pytest.raises(TransportError) as excinfo:
        transport.declare(ns_names, 1, quorum=True)
    assert excinfo.value.reason == "precondition_failed"


def test_memory_crash_returns_unacked_and_drops_waiting_publishes() -> None:
    names = Names("crash")
    consumer = connect("memory://crash-test")
    consumer.declare(names, 1)
    publisher = connect("memory://crash-test")
    for i in range(4):
        publisher.publish(names.updates_exchange, names.shard_key(0), b"%d" % i)
    consumer.consume(names.updates_queue(0), prefetch=2)
    held = [consumer.get(1.0), consumer.get(1.0)]
    assert isinstance(consumer, MemoryTransport)
    consumer.crash()
    successor = connect("memory://crash-test")
    successor.consume(names.updates_queue(0), prefetch=10)
    got = drain(successor, timeout=0.1)
    assert [(d.body, d.redelivered) for d in got] == [
        (b"0", True),
        (b"1", True),
        (b"2", False),
        (b"3", False),
    ]
    assert all(h is not None for h in held)


def test_memory_full_queue_makes_publisher_wait() -> None:
    names = Names("full")
    operator = MemoryTransport()
    operator.broker.declare_exchange(names.updates_exchange, "direct")
    limited = {"x-queue-type": "classic", "x-max-length-bytes": 3000, "x-overflow": "reject-publish"}
    operator.broker.declare_queue(names.updates_queue(0), limited)
    operator.broker.bind(names.updates_exchange, names.updates_queue(0), names.shard_key(0))
    publisher = MemoryTransport(operator.broker, window_messages=2)
    done = threading.Event()

    def publish_all() -> None:
        for i in range(10):
            publisher.publish(names.updates_exchange, names.shard_key(0), b"%d" % i + bytes(999))
        publisher.flush()
        done.set()

    thread = threading.Thread(target=publish_all, daemon=True)
    thread.start()
    time.sleep(0.3)
    assert not done.is_set() and operator.queue_length(names.updates_queue(0)) == 3
    operator.consume(names.updates_queue(0), prefetch=1)
    got = drain(operator, timeout=0.5)
    thread.join(5)
    assert done.is_set()
    assert [int(d.body[:1]) for d in got] == list(range(10))


# RabbitMQ only ---------------------------------------------------------------------------------------------


def _connection_named(management: Management, name: str, timeout: float = 30.0) -> str:
    """The broker's name of the connection whose client_properties carry ``name`` (the stats lag a little)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for connection in management.get("/connections?columns=name,client_properties"):
            if connection.get("client_properties", {}).get("connection_name") == name:
                return str(connection["name"])
        time.sleep(0.5)
    raise AssertionError(f"connection {name} not listed by the management API")


def _kill_connection(management: Management, name: str) -> None:
    management.delete(f"/connections/{q(_connection_named(management, name))}")


@pytest.mark.broker
def test_full_queue_makes_publisher_wait_until_drained(
    amqp_url: str, management: Management, names: Names, vhost: str
) -> None:
    apply(management, definitions(names, 1, max_queue_bytes=1 << 20, vhost=vhost))
    publisher = connect(amqp_url, window_messages=32)
    consumer = connect(amqp_url)
    count, size = 120, 64 << 10
    done = threading.Event()
    errors: list[BaseException] = []
    waited_before = metrics.BLOCKED_SECONDS.labels("queue_full")._value.get()

    def publish_all() -> None:
        try:
            for i in range(count):
                publisher.publish(
                    names.updates_exchange, names.shard_key(0), i.to_bytes(4, "big") + bytes(size)
                )
            publisher.flush()
        except BaseException as exc:
            errors.append(exc)
        done.set()

    thread = threading.Thread(target=publish_all, daemon=True)
    thread.start()
    try:
        time.sleep(3.0)
        assert not done.is_set(), "the publisher finished although the queue holds at most 1 MiB"
        # the management API fills in a new queue's statistics only at its next collection (every few seconds)
        path = f"/queues/{q(vhost)}/{q(names.updates_queue(0))}"
        stats_deadline = time.monotonic() + 30
        while "message_bytes" not in (queue := management.get(path)) and time.monotonic() < stats_deadline:
            time.sleep(0.5)
        assert queue["message_bytes"] <= 1 << 20
        consumer.consume(names.updates_queue(0), prefetch=4)
        # wait for every message, not for a quiet spell: on a loaded machine the publisher's nack back-off
        # can leave the queue idle for seconds while it still owes messages
        got: list[Delivery] = []
        deadline = time.monotonic() + 120
        while len(got) < count and time.monotonic() < deadline:
            if (delivery := consumer.get(1.0)) is not None:
                got.append(delivery)
                consumer.ack(delivery)
        thread.join(60)
    finally:
        publisher.close()
        consumer.close()
    assert not errors and done.is_set()
    assert sorted(int.from_bytes(d.body[:4], "big") for d in got) == list(range(count))
    assert metrics.BLOCKED_SECONDS.labels("queue_full")._value.get() > waited_before


@pytest.mark.broker
def test_publisher_connection_killed_mid_stream_reconnects(
    amqp_url: str, management: Management, names: Names
) -> None:
    name = f"{names.namespace}-publisher"
    publisher = connect(amqp_url, window_messages=16, name=name)
    publisher.declare(names, 1)
    consumer = connect(amqp_url)
    consumer.consume(names.updates_queue(0), prefetch=16)
    count = 400
    received: set[int] = set()
    killer = threading.Thread(target=_kill_connection, args=(management, name))
    try:
        for i in range(count):
            publisher.publish(
                names.updates_exchange, names.shard_key(0), i.to_bytes(4, "big") + bytes(32 << 10)
            )
            if i == 50:
                killer.start()
            if i % 20 == 0:  # keep the queue short while publishing
                while (d := consumer.get(0)) is not None:
                    received.add(int.from_bytes(d.body[:4], "big"))
                    consumer.ack(d)
            if i > 50 and killer.is_alive():
                time.sleep(0.05)  # publish slowly until the kill lands mid-stream
        killer.join()
        publisher.flush(timeout=60)
        received |= {int.from_bytes(d.body[:4], "big") for d in drain(consumer, timeout=3.0)}
        assert publisher.reconnects >= 1  # type: ignore[attr-defined]
    finally:
        publisher.close()
        consumer.close()
    assert received == set(range(count)), f"missing {sorted(set(range(count)) - received)[:10]}"


@pytest.mark.broker
def test_unacked_deliveries_return_after_consumer_connection_dies(
    amqp_url: str, management: Management, names: Names
) -> None:
    publisher = connect(amqp_url)
    publisher.declare(names, 1)
    for i in range(6):
        publisher.publish(names.updates_exchange, names.shard_key(0), b"%d" % i)
    publisher.flush()
    name = f"{names.namespace}-consumer"
    consumer = connect(amqp_url, name=name)
    try:
        consumer.consume(names.updates_queue(0), prefetch=3)
        held = [consumer.get(5.0) for _ in range(3)]
        assert all(held)
        _kill_connection(management, name)
        for delivery in held:
            assert delivery is not None
            consumer.ack(delivery)  # acks of a dead connection's deliveries are ignored, not errors
        again = drain(consumer, timeout=5.0)
    finally:
        consumer.close()
        publisher.close()
    assert sorted(int(d.body) for d in again) == list(range(6))
    assert {d.body for d in again if d.redelivered} >= {d.body for d in held if d is not None}


@pytest.mark.broker
def test_heartbeats_survive_long_cpu_work(amqp_url: str, names: Names) -> None:
    transport = connect(amqp_url + ("&" if "?" in amqp_url else "?") + "heartbeat=1")
    try:
        transport.declare(names, 1)
        deadline = time.monotonic() + 6.0
        spin = 0
        while time.monotonic() < deadline:  # pure-Python work holding the GIL most of the time
            spin += sum(range(1000))
        transport.publish(names.updates_exchange, names.shard_key(0), b"after the work")
        transport.flush(timeout=10)
        assert transport.reconnects == 0  # type: ignore[attr-defined]
    finally:
        transport.close()


@pytest.mark.broker
def test_connect_to_a_dead_port_fails_with_transport_error() -> None:
    with pytest.raises(TransportError):
        connect("amqp://guest:guest@127.0.0.1:1/%2F", reconnect_timeout=1.0)


@pytest.mark.broker
def test_large_messages_arrive_whole_with_wide_reads_on_our_connection_only(
    amqp_url: str, names: Names
) -> None:
    """Our connections read the socket in 256 KiB pieces (pika: 4 KiB); multi-frame messages still arrive
    byte for byte, and a plain pika connection in the same process keeps pika's own read size."""
    import os

    import pika

    bodies = [os.urandom((4 << 20) + 5), os.urandom(131_067), os.urandom(1)]
    with connect(amqp_url) as t:
        t.declare(names, 1)
        for body in bodies:
            t.publish(names.updates_exchange, names.shard_key(0), body)
        t.flush()
        t.consume(names.updates_queue(0), prefetch=4)
        got = []
        for _ in bodies:
            delivery = t.get(timeout=30)
            assert delivery is not None
            got.append(delivery.body)
            t.ack(delivery)
        assert t._connection._transport._MAX_RECV_BYTES == 256 << 10
    assert got == bodies
    plain = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        assert plain._impl._transport._MAX_RECV_BYTES == 4096
    finally:
        plain.close()

"""An in-process broker and transport with RabbitMQ's semantics, for unit tests of the layers above the
transport.

What it keeps from RabbitMQ, because callers depend on it: direct/fanout routing from the declared topology;
``mandatory`` publishing (unroutable -> ``TransportError``); queues at ``x-max-length-bytes`` with
``reject-publish`` hold publishes back (they wait inside the publisher's window until a consumer makes room);
prefetch; deliveries stay unacknowledged until acked and return to the queue with ``redelivered=True`` when
their consumer is cancelled or its connection dies (``crash``); streams keep messages after acks and are read
from an ``x-stream-offset``; ``dead_letter`` copies to ``{ns}.dlx`` with the reason headers; every message
carries the publishing connection's user as ``user_id``. Transports made with the same ``MemoryBroker`` (or
the same ``memory://NAME`` URL) see each other's messages.
"""

from __future__ import annotations

import datetime
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from fedq import metrics
from fedq.errors import TransportError
from fedq.topology import DEFAULT_MODELS_RETENTION_BYTES, Names, definitions, namespace_of
from fedq.transport.base import Delivery, Transport, dead_letter_headers, exclusive_refusal

DEFAULT_WINDOW_MESSAGES = 64
DEFAULT_WINDOW_BYTES = 64 << 20
DEFAULT_FULL_QUEUE_TIMEOUT = 300.0


@dataclass
class _Message:
    exchange: str
    routing_key: str
    body: bytes
    headers: dict[str, Any]
    user_id: str
    timestamp: float
    redelivered: bool = False


@dataclass
class _Queue:
    name: str
    arguments: dict[str, Any]
    messages: deque[_Message] = field(default_factory=deque)
    nbytes: int = 0
    first_offset: int = 0  # streams: the offset of messages[0]
    consumers: int = 0
    exclusive: bool = False  # held by one exclusive consumer

    @property
    def is_stream(self) -> bool:
        return self.arguments.get("x-queue-type") == "stream"

    @property
    def max_bytes(self) -> int | None:
        value = self.arguments.get("x-max-length-bytes")
        return None if value is None else int(value)

    def has_room(self, size: int) -> bool:
        """Streams never push back: they drop their oldest entries (retention) instead."""
        if self.is_stream or self.max_bytes is None:
            return True
        if self.arguments.get("x-overflow") != "reject-publish":
            return True
        return self.nbytes + size <= self.max_bytes

    def append(self, message: _Message) -> None:
        self.messages.append(message)
        self.nbytes += len(message.body)
        limit = self.max_bytes
        while limit is not None and self.nbytes > limit and len(self.messages) > 1:
            dropped = self.messages.popleft()  # drop-head (dead-letter queue) or stream retention
            self.nbytes -= len(dropped.body)
            self.first_offset += 1

    def pop(self) -> _Message:
        message = self.messages.popleft()
        self.nbytes -= len(message.body)
        return message

    def requeue(self, message: _Message) -> None:
        message.redelivered = True
        self.messages.appendleft(message)
        self.nbytes += len(message.body)


@dataclass
class _Exchange:
    name: str
    kind: str
    bindings: list[tuple[str, str]] = field(default_factory=list)  # (queue, routing key)

    def route(self, routing_key: str) -> list[str]:
        if self.kind == "fanout":
            return [queue for queue, _ in self.bindings]
        return [queue for queue, key in self.bindings if key == routing_key]


@dataclass
class _Pending:
    """A publish that a full queue refused; it stays in its publisher's window until every target has room."""

    owner: MemoryTransport
    message: _Message
    targets: list[str]


class MemoryBroker:
    """The shared state: exchanges, queues, and publishes waiting for room. One condition guards all of it."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.exchanges: dict[str, _Exchange] = {}
        self.queues: dict[str, _Queue] = {}
        self.pending: deque[_Pending] = deque()

    def declare_exchange(self, name: str, kind: str) -> None:
        existing = self.exchanges.get(name)
        if existing is not None and existing.kind != kind:
            raise TransportError(
                f"exchange {name} exists with type {existing.kind}", reason="precondition_failed"
            )
        self.exchanges.setdefault(name, _Exchange(name, kind))

    def declare_queue(self, name: str, arguments: dict[str, Any]) -> None:
        existing = self.queues.get(name)
        if existing is not None and existing.arguments != arguments:
            raise TransportError(f"queue {name} exists with other arguments", reason="precondition_failed")
        self.queues.setdefault(name, _Queue(name, dict(arguments)))

    def bind(self, exchange: str, queue: str, routing_key: str) -> None:
        bindings = self.exchanges[exchange].bindings
        if (queue, routing_key) not in bindings:
            bindings.append((queue, routing_key))

    def route(self, message: _Message) -> list[str]:
        exchange = self.exchanges.get(message.exchange)
        if exchange is None:
            raise TransportError(f"no exchange {message.exchange!r}", reason="not_found")
        return exchange.route(message.routing_key)

    def try_enqueue(self, message: _Message, targets: list[str]) -> bool:
        """All-or-nothing: a message enters every target queue at once or waits (simpler than RabbitMQ)."""
        queues = [self.queues[name] for name in targets]
        if not all(queue.has_room(len(message.body)) for queue in queues):
            return False
        for queue in queues:
            queue.append(_Message(**{**message.__dict__, "headers": dict(message.headers)}))
        self.cond.notify_all()
        return True

    def retry_pending(self) -> None:
        """Called whenever room may have appeared; publishes stay in order per publisher."""
        blocked: set[int] = set()
        for item in list(self.pending):
            if id(item.owner) in blocked:
                continue
            if self.try_enqueue(item.message, item.targets):
                self.pending.remove(item)
                item.owner.in_flight_messages -= 1
                item.owner.in_flight_bytes -= len(item.message.body)
            else:
                blocked.add(id(item.owner))
        self.cond.notify_all()


_BROKERS: dict[str, MemoryBroker] = {}
_BROKERS_LOCK = threading.Lock()


def named_broker(name: str) -> MemoryBroker:
    """The process-wide broker for ``memory://NAME``, so separately connected components can talk."""
    with _BROKERS_LOCK:
        return _BROKERS.setdefault(name, MemoryBroker())


@dataclass
class _Consumer:
    tag: str
    queue: str
    prefetch: int
    unacked: dict[int, tuple[_Message, int | None]] = field(
        default_factory=dict
    )  # seq -> (message, stream offset)
    stream_next: int = 0


class MemoryTransport(Transport):
    """A connection to a ``MemoryBroker``; like the RabbitMQ transport, meant for one user thread."""

    def __init__(
        self,
        broker: MemoryBroker | None = None,
        *,
        user: str = "guest",
        window_messages: int = DEFAULT_WINDOW_MESSAGES,
        window_bytes: int = DEFAULT_WINDOW_BYTES,
        full_queue_timeout: float = DEFAULT_FULL_QUEUE_TIMEOUT,
        role: str = "client",
        name: str = "memory",
        reconnect_timeout: float = 0.0,
        connect_timeout: float = 0.0,
    ) -> None:
        """``name``, ``reconnect_timeout`` and ``connect_timeout`` mean nothing here; they are accepted so
        that callers pass the RabbitMQ transport's options whatever the URL."""
        self.broker = broker or MemoryBroker()
        self.role = role
        self.name = name
        self.user = user
        self.window_messages = window_messages
        self.window_bytes = window_bytes
        self.full_queue_timeout = full_queue_timeout
        self.in_flight_messages = 0
        self.in_flight_bytes = 0
        self._consumers: dict[str, _Consumer] = {}
        self._seq = itertools.count(1)
        self._closed = False
        self._rotation = 0

    # publishing ---------------------------------------------------------------------------------------------
    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        headers: dict[str, Any] | None = None,
        persistent: bool = True,
    ) -> None:
        self._check_open()
        message = _Message(exchange, routing_key, bytes(body), dict(headers or {}), self.user, time.time())
        with self.broker.cond:
            targets = self.broker.route(message)
            if not targets:
                raise TransportError(f"unroutable: {exchange!r} / {routing_key!r}", reason="unroutable")
            self._wait(lambda: self._window_has_room(len(message.body)), "publish window")
            if not self.broker.try_enqueue(message, targets):
                self.broker.pending.append(_Pending(self, message, targets))
                self.in_flight_messages += 1
                self.in_flight_bytes += len(message.body)

    def _window_has_room(self, size: int) -> bool:
        full = (
            self.in_flight_messages >= self.window_messages or self.in_flight_bytes + size > self.window_bytes
        )
        return self.in_flight_messages == 0 or not full

    def flush(self, timeout: float | None = None) -> None:
        self._check_open()
        with self.broker.cond:
            self._wait(lambda: self.in_flight_messages == 0, "flush", timeout)

    def _wait(self, predicate: Any, what: str, timeout: float | None = None) -> None:
        """Wait under the broker's condition; a queue full past the bound is an error, as with nacks."""
        limit = self.full_queue_timeout if timeout is None else min(timeout, self.full_queue_timeout)
        if not self.broker.cond.wait_for(predicate, timeout=limit):
            raise TransportError(f"{what}: queues stayed full for {limit:.1f} s", reason="queue_full")

    # consuming ----------------------------------------------------------------------------------------------
    def consume(
        self, queue: str, *, prefetch: int, arguments: dict[str, Any] | None = None, exclusive: bool = False
    ) -> str:
        self._check_open()
        with self.broker.cond:
            target = self.broker.queues.get(queue)
            if target is None:
                raise TransportError(f"no queue {queue!r}", reason="not_found")
            if target.exclusive or (exclusive and target.consumers):
                raise TransportError(exclusive_refusal(queue), reason="exclusive")
            target.consumers += 1
            target.exclusive = exclusive
            consumer = _Consumer(f"memory-ctag-{next(self._seq)}", queue, prefetch)
            if target.is_stream:
                consumer.stream_next = _stream_start(target, (arguments or {}).get("x-stream-offset", "next"))
            self._consumers[consumer.tag] = consumer
            return consumer.tag

    def cancel(self, consumer_tag: str) -> None:
        with self.broker.cond:
            consumer = self._consumers.pop(consumer_tag, None)
            if consumer is not None:
                self._requeue(consumer)
                self._release(consumer)

    def _release(self, consumer: _Consumer) -> None:
        queue = self.broker.queues.get(consumer.queue)
        if queue is not None:
            queue.consumers -= 1
            queue.exclusive = queue.exclusive and queue.consumers > 0

    def get(self, timeout: float | None = None) -> Delivery | None:
        self._check_open()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.broker.cond:
            while True:
                delivery = self._take()
                if delivery is not None:
                    return delivery
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self.broker.cond.wait(remaining)

    def _take(self) -> Delivery | None:
        consumers = list(self._consumers.values())
        for i in range(len(consumers)):
            consumer = consumers[(self._rotation + i) % len(consumers)]
            if len(consumer.unacked) >= consumer.prefetch:
                continue
            queue = self.broker.queues[consumer.queue]
            if queue.is_stream:
                delivery = self._take_stream(consumer, queue)
            elif queue.messages:
                message = queue.pop()
                delivery = self._deliver(consumer, message, None)
                self.broker.retry_pending()
            else:
                delivery = None
            if delivery is not None:
                self._rotation = (self._rotation + i + 1) % len(consumers)
                return delivery
        return None

    def _take_stream(self, consumer: _Consumer, queue: _Queue) -> Delivery | None:
        consumer.stream_next = max(consumer.stream_next, queue.first_offset)
        index = consumer.stream_next - queue.first_offset
        if index >= len(queue.messages):
            return None
        consumer.stream_next += 1
        return self._deliver(consumer, queue.messages[index], consumer.stream_next - 1)

    def _deliver(self, consumer: _Consumer, message: _Message, offset: int | None) -> Delivery:
        seq = next(self._seq)
        consumer.unacked[seq] = (message, offset)
        headers = dict(message.headers)
        if offset is not None:
            headers["x-stream-offset"] = offset
        return Delivery(
            queue=consumer.queue,
            body=message.body,
            headers=headers,
            routing_key=message.routing_key,
            user_id=message.user_id,
            redelivered=message.redelivered,
            tag=(consumer.tag, seq),
        )

    def ack(self, delivery: Delivery, *, multiple: bool = False) -> None:
        """Acks of deliveries whose consumer is gone are ignored: those messages were already requeued. A
        delivery settled twice is an error, as the broker's 'unknown delivery tag' is."""
        consumer_tag, seq = delivery.tag
        with self.broker.cond:
            consumer = self._consumers.get(consumer_tag)
            if consumer is None or self._closed:
                return
            if seq not in consumer.unacked:
                raise TransportError(
                    f"unknown delivery tag {seq} on {delivery.queue}", reason="precondition_failed"
                )
            for s in [s for s in consumer.unacked if s == seq or (multiple and s < seq)]:
                del consumer.unacked[s]
            self.broker.cond.notify_all()

    def dead_letter(self, delivery: Delivery, reason: str, detail: str = "") -> None:
        self._check_open()
        headers = dead_letter_headers(delivery, reason, detail)
        names = Names(namespace_of(delivery.queue))
        self.publish(names.dead_letter_exchange, "", delivery.body, headers=headers)
        self.flush()
        metrics.DEAD_LETTERED.labels(self.role, reason).inc()
        self.ack(delivery)

    # topology and lifetime ----------------------------------------------------------------------------------
    def publish_tracked(self, exchange: str, routing_key: str, body: bytes, *, stream: str) -> int:
        with self.broker.cond:
            target = self.broker.queues.get(stream)
            if target is None or not target.is_stream:
                raise TransportError(f"no stream {stream!r}", reason="not_found")
            offset = target.first_offset + len(target.messages)
            self.publish(exchange, routing_key, body)
            self.flush()
            return offset

    def declare(
        self,
        names: Names,
        shards: int,
        *,
        quorum: bool = False,
        models_retention_bytes: int = DEFAULT_MODELS_RETENTION_BYTES,
    ) -> None:
        self._check_open()
        spec = definitions(names, shards, quorum=quorum, models_retention_bytes=models_retention_bytes)
        with self.broker.cond:
            for exchange in spec["exchanges"]:
                self.broker.declare_exchange(exchange["name"], exchange["type"])
            for queue in spec["queues"]:
                existing = self.broker.queues.get(queue["name"])
                if existing is not None and existing.is_stream:
                    continue  # a stream declared beforehand keeps its limits (see Transport.declare)
                self.broker.declare_queue(queue["name"], queue["arguments"])
            for binding in spec["bindings"]:
                self.broker.bind(binding["source"], binding["destination"], binding["routing_key"])

    def queue_consumers(self, name: str) -> int | None:
        self._check_open()
        with self.broker.cond:
            queue = self.broker.queues.get(name)
            return None if queue is None else queue.consumers

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self.crash()

    def crash(self) -> None:
        """Die as a killed process would: unacked deliveries return to their queues, waiting publishes vanish.

        Tests use it to simulate a crash.
        """
        with self.broker.cond:
            for consumer in self._consumers.values():
                self._requeue(consumer)
                self._release(consumer)
            self._consumers.clear()
            for item in [p for p in self.broker.pending if p.owner is self]:
                self.broker.pending.remove(item)
            self.in_flight_messages = self.in_flight_bytes = 0
            self._closed = True
            self.broker.cond.notify_all()

    def _requeue(self, consumer: _Consumer) -> None:
        queue = self.broker.queues.get(consumer.queue)
        if queue is not None and not queue.is_stream:
            for seq in sorted(consumer.unacked, reverse=True):
                queue.requeue(consumer.unacked[seq][0])
        consumer.unacked.clear()
        self.broker.cond.notify_all()

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError("transport is closed", reason="closed")

    def unacked(self) -> int:
        """Deliveries held and not yet acknowledged, over all consumers (tests assert prefetch with it)."""
        with self.broker.cond:
            return sum(len(c.unacked) for c in self._consumers.values())

    def queue_length(self, queue: str) -> int:
        """Messages ready in a queue (not counting deliveries held by consumers)."""
        with self.broker.cond:
            return len(self.broker.queues[queue].messages)


def _stream_start(queue: _Queue, offset: Any) -> int:
    """Where a stream consumer starts, for the offset specs RabbitMQ accepts."""
    end = queue.first_offset + len(queue.messages)
    if offset == "first":
        return queue.first_offset
    if offset == "last":
        return max(queue.first_offset, end - 1)
    if offset == "next":
        return end
    if isinstance(offset, datetime.datetime):
        stamp = offset.timestamp()
        for i, message in enumerate(queue.messages):
            if message.timestamp >= stamp:
                return queue.first_offset + i
        return end
    if isinstance(offset, int):
        return offset
    raise TransportError(f"unsupported x-stream-offset {offset!r}", reason="stream_offset")

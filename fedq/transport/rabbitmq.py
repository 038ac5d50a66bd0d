"""The RabbitMQ transport: pika behind the ``Transport`` interface (the only fedq module importing pika).

Threads. A pika connection is not thread-safe, and a connection served only when the user thread calls into it
misses heartbeats while that thread folds tensors for minutes. So one I/O thread owns the connection and runs
pika's select loop all the time; the user thread hands work over with ``add_callback_threadsafe`` and waits on
a condition. Deliveries reach the user thread through a deque whose length is bounded by the consumers'
prefetch (the I/O thread must never block on it, or heartbeats would stop).

Publishing. Every message is published with ``mandatory`` and a confirm; up to ``window_messages`` /
``window_bytes`` are unconfirmed at once (pipelined: confirms overlap), and ``publish`` blocks while the
window is full, so a slow broker slows the publisher instead of growing its memory. A nack (a queue at its
length limit with ``x-overflow: reject-publish``, or a broker-side failure) is retried with backoff for up to
``full_queue_timeout`` seconds, so a full queue makes publishers wait for a consumer to drain it; only then is
it a ``TransportError``. Every message carries the ``user_id`` property, which RabbitMQ checks against the
authenticated user: receivers attribute messages to that validated name.

Failures. A first connection that cannot succeed by retrying (an unknown host, a refused login, a missing
vhost, an untrusted certificate) fails at once with its cause and the fix; one that may (nothing listening
yet, a timeout) is retried for ``connect_timeout`` seconds (0: one attempt), one log line per attempt. A lost
connection is re-established with bounded exponential backoff (for at most ``reconnect_timeout`` seconds);
unconfirmed messages are then published again (at-least-once: receivers dedupe) and consumers resumed (streams
from the offset after the last one handed out). Deliveries of the dead connection are dropped from the local
queue and acks of them are ignored: the broker redelivers them.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import socket
import ssl
import struct
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import pika
import pika.data
import pika.exceptions
from pika.adapters.select_connection import IOLoop
from pika.channel import Channel

from fedq import metrics
from fedq.errors import TransportError
from fedq.topology import (
    DEFAULT_MODELS_RETENTION_BYTES,
    Names,
    definitions,
    namespace_of,
    with_passive_stream,
)
from fedq.transport.base import (
    TRACK_HEADER,
    Delivery,
    Transport,
    dead_letter_headers,
    exclusive_refusal,
)

log = logging.getLogger(__name__)

DEFAULT_WINDOW_MESSAGES = 256
DEFAULT_WINDOW_BYTES = 64 << 20
DEFAULT_FULL_QUEUE_TIMEOUT = 600.0
DEFAULT_RECONNECT_TIMEOUT = 60.0
CALL_TIMEOUT = 60.0
_BACKOFF_FIRST = 0.2
_BACKOFF_MAX = 5.0
_NACK_BACKOFF_FIRST = 0.05
_NACK_BACKOFF_MAX = 1.0
_TLS_QUERY_KEYS = ("cafile", "certfile", "keyfile", "server_name")
_RECV_BYTES = 256 << 10  # per socket read (pika: 4 KiB); see _widen_reads
_CONSUME_BYTES = 4 << 20  # per I/O-loop event before other events get their turn (pika: 100 KiB)

_INEQUIVALENT_RETENTION = re.compile(r"inequivalent arg 'x-max-length-bytes' for queue '([^']+)'")
_REPLY_IN_TEXT = re.compile(r"\(\d{3}\) '([^']+)'")  # pika's "(530) 'NOT_ALLOWED - vhost x not found'"
_REPLY_REASONS = {
    320: "connection_forced",
    403: "access_refused",
    404: "not_found",
    405: "resource_locked",
    406: "precondition_failed",
    530: "not_allowed",
}


_DECODE_VALUE = pika.data.decode_value
_FIXED_SIZES = {b"T": 8, b"d": 8, b"f": 4}  # field types whose raw value Python may fail to convert


def _tolerant_decode_value(encoded: bytes, offset: int) -> tuple[Any, int]:
    """pika's ``decode_value``, except that a timestamp or float Python cannot represent (a timestamp of 2^62,
    a double of inf, NaN or 1e300, which pika turns into an int) decodes as None instead of raising.

    A header is any client's to write, and pika decodes a delivery's headers in the I/O thread: a value it
    fails on aborts the connection, the broker redelivers the message, and the consumer reconnects in a loop
    without ever seeing it (measured: 694 reconnects in 70 s). Installed for this process's pika (fedq's
    transport is its only user); fedq reads no header a client writes."""
    try:
        return _DECODE_VALUE(encoded, offset)
    except (OverflowError, ValueError, OSError):
        size = _FIXED_SIZES.get(bytes(encoded[offset : offset + 1]))
        if size is None:
            raise
        return None, offset + 1 + size


pika.data.decode_value = _tolerant_decode_value


def _error_from(exc: BaseException, what: str) -> TransportError:
    """A pika exception as a ``TransportError`` whose reason is the AMQP reply (``access_refused``, ...)."""
    code = getattr(exc, "reply_code", None)
    reason = _REPLY_REASONS.get(code, f"amqp_{code}") if isinstance(code, int) else "connection_lost"
    text = getattr(exc, "reply_text", None) or repr(exc)
    if reason == "not_found":  # an operator's usual cause: a namespace whose topology was never applied
        text += (
            " (a wrong --namespace, or one whose topology is not applied: `fedq broker apply --namespace NS`)"
        )
    return TransportError(f"{what}: {text}", reason=reason)


@dataclass
class _Outgoing:
    """One message in the publish window, kept until confirmed so it can be sent again after a reconnect."""

    number: int
    exchange: str
    routing_key: str
    body: bytes
    properties: pika.BasicProperties
    created: float = field(default_factory=time.monotonic)
    channel_generation: int = -1  # the publish channel it was last sent on; -1: not sent there yet
    first_nack: float | None = None
    returned: str | None = None
    done: bool = False
    error: TransportError | None = None
    dead_letter_of: tuple[Delivery, str] | None = None  # (the refused delivery, reason): acked when confirmed


@dataclass
class _ConsumerSpec:
    tag: str
    queue: str
    prefetch: int
    arguments: dict[str, Any]
    exclusive: bool = False
    channel: Channel | None = None
    next_stream_offset: int | None = None  # set once a stream delivery was handed out
    refused_since: float | None = (
        None  # exclusive and refused after a reconnect: retried until this + timeout
    )


@dataclass
class _Probe:
    """A tracked publish: the consumer channel that watches for it and the offset it was given."""

    token: str
    channel: Channel | None = None
    offset: int | None = None
    seen: threading.Event = field(default_factory=threading.Event)


class _Call:
    """A request run on the I/O thread whose completion the user thread waits for."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.error: TransportError | None = None
        self.result: Any = None

    def finish(self, result: Any = None, error: TransportError | None = None) -> None:
        if not self.event.is_set():
            self.result, self.error = result, error
            self.event.set()


def parameters_from_url(url: str, connection_name: str) -> pika.URLParameters:
    """Pika parameters for a URL; ``amqps`` URLs may add ``cafile``/``certfile``/``keyfile``/``server_name``.

    Certificates are always verified (``CERT_REQUIRED`` and host name check): a URL cannot turn that off.
    """
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    tls = {key: query.pop(key) for key in _TLS_QUERY_KEYS if key in query}
    params = pika.URLParameters(urlunsplit(parts._replace(query=urlencode(query))))
    if parts.scheme == "amqps":
        context = ssl.create_default_context(cafile=tls.get("cafile"))
        if "certfile" in tls:
            context.load_cert_chain(tls["certfile"], tls.get("keyfile"))
        params.ssl_options = pika.SSLOptions(context, tls.get("server_name") or parts.hostname)
    params.client_properties = {"connection_name": connection_name, "product": "fedq"}
    return params


def _widen_reads(connection: pika.SelectConnection) -> None:
    """Read the socket in 256 KiB pieces instead of pika's 4 KiB.

    Pika appends each read to its frame buffer with ``bytes +=``, so a 128 KiB frame read 4 KiB at a time is
    copied ~16 times over, and every read is a trip through the I/O loop in Python: for 4 MiB chunks that was
    the largest CPU cost of a receiving process (py-spy), CPU a two-core machine's broker needs. Set on this
    connection's socket transport only (an instance attribute), so other pika users keep pika's defaults.
    """
    transport = getattr(connection, "_transport", None)
    if transport is not None and hasattr(transport, "_MAX_RECV_BYTES"):
        transport._MAX_RECV_BYTES = _RECV_BYTES
        transport._MAX_CONSUME_BYTES = _CONSUME_BYTES


class RabbitTransport(Transport):
    """A broker connection served by its own I/O thread; all public methods are for one user thread."""

    def __init__(
        self,
        url: str,
        *,
        window_messages: int = DEFAULT_WINDOW_MESSAGES,
        window_bytes: int = DEFAULT_WINDOW_BYTES,
        full_queue_timeout: float = DEFAULT_FULL_QUEUE_TIMEOUT,
        reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT,
        connect_timeout: float | None = None,
        role: str = "client",
        name: str | None = None,
    ) -> None:
        self.window_messages = window_messages
        self.window_bytes = window_bytes
        self.full_queue_timeout = full_queue_timeout
        self.reconnect_timeout = reconnect_timeout
        self.connect_timeout = reconnect_timeout if connect_timeout is None else connect_timeout
        self.role = role
        self.name = name or f"fedq-{role}-{os.getpid()}-{id(self):x}"
        self.user = unquote(urlsplit(url).username or "guest")
        self._params = parameters_from_url(url, self.name)
        self._where = f"{self._params.host}:{self._params.port}"
        self._attempts = 0

        self._cond = threading.Condition()
        self._outgoing: OrderedDict[int, _Outgoing] = OrderedDict()
        self._in_flight_bytes = 0
        self.peak_in_flight_messages = 0
        self.peak_in_flight_bytes = 0
        self._errors: deque[TransportError] = deque()
        self._fatal: TransportError | None = None
        self._blocked = False
        self._deliveries: deque[Delivery] = deque()
        self._consumers: dict[str, _ConsumerSpec] = {}
        self._unacked: dict[str, int] = {}
        self._numbers = itertools.count(1)
        self.reconnects = 0

        # Owned by the I/O thread.
        self._ioloop = IOLoop()
        self._connection: pika.SelectConnection | None = None
        self._pub_channel: Channel | None = None
        self._pub_generation = 0
        self._pub_ready = False
        self._tags: dict[int, _Outgoing] = {}
        self._next_tag = 1
        self._calls: set[_Call] = set()
        self._closing = False
        self._down_since: float | None = None
        self._backoff = _BACKOFF_FIRST
        self._opened_once = False

        self._thread = threading.Thread(target=self._run, name=f"{self.name}-io", daemon=True)
        self._thread.start()
        with self._cond:
            self._cond.wait_for(lambda: self._pub_ready or self._fatal is not None)
            if self._fatal is not None:
                error = self._fatal
                self._thread.join(timeout=5)
                raise error

    # user thread: publishing --------------------------------------------------------------------------------
    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        headers: dict[str, Any] | None = None,
        persistent: bool = True,
    ) -> None:
        self._publish(exchange, routing_key, body, headers, persistent)

    def _publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        headers: dict[str, Any] | None,
        persistent: bool,
        dead_letter_of: tuple[Delivery, str] | None = None,
    ) -> _Outgoing:
        body = body if isinstance(body, bytes) else bytes(body)
        with self._cond:
            self._raise_errors()
            self._wait_for_room(len(body))
            number = next(self._numbers)
            properties = pika.BasicProperties(
                headers=dict(headers or {}),
                delivery_mode=2 if persistent else 1,
                user_id=self.user,
                message_id=f"{self.name}/{number}",
            )
            out = _Outgoing(number, exchange, routing_key, body, properties, dead_letter_of=dead_letter_of)
            self._outgoing[number] = out
            self._in_flight_bytes += len(body)
            self.peak_in_flight_messages = max(self.peak_in_flight_messages, len(self._outgoing))
            self.peak_in_flight_bytes = max(self.peak_in_flight_bytes, self._in_flight_bytes)
            metrics.IN_FLIGHT.set(len(self._outgoing))
        self._post(lambda: self._send(out))
        return out

    def _window_full(self, size: int) -> bool:
        if self._blocked:
            return True
        if not self._outgoing:
            return False  # one message larger than the byte window still goes, alone
        return len(self._outgoing) >= self.window_messages or self._in_flight_bytes + size > self.window_bytes

    def _wait_for_room(self, size: int) -> None:
        """Block (counting the time by cause) while the window is full or the broker has blocked us."""
        while self._window_full(size):
            cause = self._wait_cause()
            started = time.monotonic()
            self._cond.wait(timeout=0.5)
            metrics.BLOCKED_SECONDS.labels(cause).inc(time.monotonic() - started)
            self._raise_errors()

    def _wait_cause(self) -> str:
        if self._blocked:
            return "broker_alarm"
        if any(out.first_nack is not None for out in self._outgoing.values()):
            return "queue_full"
        return "window_full"

    def flush(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._outgoing:
                if self._fatal is not None:
                    raise self._fatal
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TransportError(
                        f"flush: {len(self._outgoing)} messages unconfirmed after {timeout} s",
                        reason="timeout",
                    )
                self._cond.wait(timeout=0.5 if remaining is None else min(0.5, remaining))
            self._raise_errors()

    def _raise_errors(self) -> None:
        """Surface failures of earlier messages (returns, exhausted nacks, refused channels) once each."""
        if self._fatal is not None:
            raise self._fatal
        if self._errors:
            error = self._errors.popleft()
            self._errors.clear()
            raise error

    # user thread: consuming ---------------------------------------------------------------------------------
    def consume(
        self, queue: str, *, prefetch: int, arguments: dict[str, Any] | None = None, exclusive: bool = False
    ) -> str:
        spec = _ConsumerSpec(
            f"{self.name}/{queue}/{next(self._numbers)}", queue, prefetch, dict(arguments or {}), exclusive
        )
        with self._cond:
            self._consumers[spec.tag] = spec  # registered first, so a reconnect during the call resumes it
        try:
            self._call(lambda call: self._start_consumer(spec, call), f"consume {queue}")
        except TransportError:
            with self._cond:
                self._consumers.pop(spec.tag, None)
            raise
        metrics.PREFETCH_LIMIT.labels(queue).set(prefetch)
        return spec.tag

    def cancel(self, consumer_tag: str) -> None:
        with self._cond:
            spec = self._consumers.pop(consumer_tag, None)
            if spec is None:
                return
            self._drop_deliveries(lambda d: d.tag[2] == consumer_tag)
        self._call(lambda call: self._stop_consumer(spec, call), f"cancel {spec.queue}")

    def get(self, timeout: float | None = None) -> Delivery | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._deliveries:
                self._raise_errors()
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(timeout=remaining)
            delivery = self._deliveries.popleft()
            spec = self._consumers.get(delivery.tag[2])
            if spec is not None and "x-stream-offset" in delivery.headers:
                spec.next_stream_offset = int(delivery.headers["x-stream-offset"]) + 1
            self._count_unacked(delivery.queue, +1)
            return delivery

    def ack(self, delivery: Delivery, *, multiple: bool = False) -> None:
        channel, delivery_tag, _ = delivery.tag
        with self._cond:
            self._count_unacked(delivery.queue, -1)
        self._post(lambda: self._ack(channel, delivery_tag, multiple))

    def dead_letter(self, delivery: Delivery, reason: str, detail: str = "") -> None:
        """Publish a copy to ``{ns}.dlx`` with the reason headers; the original is acked once the copy is
        confirmed.

        Not a ``basic.nack`` without requeue: the broker would dead-letter the message itself, but a nack
        cannot carry headers, and the reason is what makes a dead letter useful to an operator. Pipelined:
        this returns once the copy is in the publish window (as ``publish`` does), so a flood of refused
        messages goes at the rate of the window, not of one confirm round trip each; the I/O thread acks the
        original when its copy's confirm arrives (a failed copy leaves it unacked: it is redelivered). The
        copy carries only fedq's headers, never the sender's (``dead_letter_headers``).
        """
        exchange = Names(namespace_of(delivery.queue)).dead_letter_exchange
        headers = dead_letter_headers(delivery, reason, detail)
        out = self._publish(exchange, delivery.routing_key, delivery.body, headers, True, (delivery, reason))
        del out

    def _count_unacked(self, queue: str, change: int) -> None:
        self._unacked[queue] = max(0, self._unacked.get(queue, 0) + change)
        metrics.PREFETCH_IN_USE.labels(queue).set(self._unacked[queue])

    def _drop_deliveries(self, predicate: Callable[[Delivery], bool]) -> None:
        self._deliveries = deque(d for d in self._deliveries if not predicate(d))

    # user thread: topology and lifetime ---------------------------------------------------------------------
    def publish_tracked(self, exchange: str, routing_key: str, body: bytes, *, stream: str) -> int:
        """A consumer of ``stream`` attached at ``next`` on a channel of its own sees the message come by with
        its offset (AMQP 0-9-1 has no other way to learn it); messages of other publishers in between are
        acked and passed over, and the channel is closed as soon as ours is seen."""
        token = f"{self.name}/tracked/{next(self._numbers)}"
        probe = _Probe(token)
        self._call(lambda call: self._start_probe(stream, probe, call), f"track {stream}")
        try:
            self._publish(exchange, routing_key, body, {TRACK_HEADER: token}, True)
            self.flush()
            probe.seen.wait(CALL_TIMEOUT)
            if probe.offset is None:
                raise TransportError(
                    f"track {stream}: the message did not appear on the stream", reason="timeout"
                )
            return probe.offset
        finally:
            self._call(lambda call: self._stop_probe(probe, call), f"untrack {stream}")

    def declare(
        self,
        names: Names,
        shards: int,
        *,
        quorum: bool = False,
        models_retention_bytes: int = DEFAULT_MODELS_RETENTION_BYTES,
    ) -> None:
        spec: dict[str, Any] | None = definitions(
            names, shards, quorum=quorum, models_retention_bytes=models_retention_bytes
        )
        while spec is not None:
            try:
                self._call(partial(self._declare, spec), f"declare {names.namespace}")
                return
            except TransportError as exc:
                found = _INEQUIVALENT_RETENTION.search(str(exc))
                if exc.reason != "precondition_failed" or found is None:
                    raise
                spec = with_passive_stream(spec, found.group(1))
                if spec is None:
                    raise
                log.warning(
                    "%s: stream %s was declared beforehand with another retention; it is used as it is "
                    "(a version it trims is reported to its reader as such): %s",
                    self.name,
                    found.group(1),
                    exc,
                )

    def queue_consumers(self, name: str) -> int | None:
        found: int | None = self._call(partial(self._queue_consumers, name), f"look up queue {name}")
        return found

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        try:
            if self._fatal is None:
                self.flush(timeout=CALL_TIMEOUT)
        finally:
            self._post(self._shutdown)
            self._thread.join(timeout=CALL_TIMEOUT)
            with self._cond:  # wake any thread still waiting on this transport: nothing will confirm now
                if self._fatal is None:
                    self._fatal = TransportError(f"{self.name}: transport closed", reason="closed")
                self._cond.notify_all()

    def _post(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the I/O thread; after a fatal error there is none and nothing left to do."""
        if self._thread.is_alive():
            self._ioloop.add_callback_threadsafe(callback)

    def _call(self, start: Callable[[_Call], None], what: str) -> Any:
        call = _Call()

        def begin() -> None:
            if self._connection is None or not self._connection.is_open:
                call.finish(error=TransportError(f"{what}: not connected", reason="connection_lost"))
                return
            self._calls = {c for c in self._calls if not c.event.is_set()}
            self._calls.add(call)
            start(call)

        with self._cond:
            self._raise_errors()
        self._post(begin)
        if not call.event.wait(CALL_TIMEOUT):
            raise TransportError(f"{what}: no answer in {CALL_TIMEOUT} s", reason="timeout")
        if call.error is not None:
            raise call.error
        return call.result

    # I/O thread: connection ---------------------------------------------------------------------------------
    def _run(self) -> None:
        self._connect()
        try:
            self._ioloop.start()
        finally:
            self._ioloop.close()

    def _connect(self) -> None:
        self._connection = pika.SelectConnection(
            self._params,
            on_open_callback=self._on_open,
            on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_closed,
            custom_ioloop=self._ioloop,
        )
        self._connection.add_on_connection_blocked_callback(lambda _c, _f: self._set_blocked(True))
        self._connection.add_on_connection_unblocked_callback(lambda _c, _f: self._set_blocked(False))

    def _on_open(self, connection: pika.SelectConnection) -> None:
        _widen_reads(connection)
        if self._opened_once:
            self.reconnects += 1
            metrics.RECONNECTS.labels(self.role).inc()
            log.info("%s: reconnected", self.name)
        self._opened_once = True
        self._down_since = None
        self._backoff = _BACKOFF_FIRST
        self._open_publish_channel()
        for spec in list(self._consumers.values()):
            self._start_consumer(spec, None)

    def _on_open_error(self, _connection: pika.SelectConnection, exc: BaseException) -> None:
        error, permanent = open_failure(exc, self._where, self.user, self._params.virtual_host)
        if permanent:
            self._die(error)
        elif not self._opened_once:
            self._first_connection_failed(error)
        else:
            self._connection_lost(exc)

    def _first_connection_failed(self, error: TransportError) -> None:
        """Retry a transient first failure for ``connect_timeout`` seconds, one log line per attempt."""
        now = time.monotonic()
        self._down_since = self._down_since or now
        self._attempts += 1
        left = self.connect_timeout - (now - self._down_since)
        if left <= 0:
            if self._attempts > 1:
                error = TransportError(
                    f"{error} (gave up after {self._attempts} attempts)", reason=error.reason
                )
            self._die(error)
            return
        delay, self._backoff = min(self._backoff, left), min(self._backoff * 2, _BACKOFF_MAX)
        log.warning("%s (attempt %d; next in %.1f s, for %.0f s more)", error, self._attempts, delay, left)
        self._ioloop.call_later(delay, self._connect)

    def _on_closed(self, _connection: pika.SelectConnection, exc: BaseException) -> None:
        if self._closing:
            self._ioloop.stop()
        else:
            log.warning("%s: connection lost: %r", self.name, exc)
            self._connection_lost(exc)

    def _connection_lost(self, exc: BaseException) -> None:
        """Forget the dead connection's channel state and deliveries, then reconnect after a backoff."""
        self._pub_channel = None
        self._pub_ready = False
        self._tags.clear()
        error = _error_from(exc, f"{self.name}: connection lost")
        for call in list(self._calls):
            call.finish(error=error)
        self._calls.clear()
        with self._cond:
            self._blocked = False
            self._drop_deliveries(lambda d: True)
            for spec in self._consumers.values():
                spec.channel = None
            for queue in list(self._unacked):
                self._count_unacked(queue, -self._unacked[queue])
            for out in self._outgoing.values():
                out.channel_generation = -1
            self._cond.notify_all()
        now = time.monotonic()
        self._down_since = self._down_since or now
        cause, _ = open_failure(exc, self._where, self.user, self._params.virtual_host)
        if now - self._down_since > self.reconnect_timeout:
            self._die(
                TransportError(
                    f"{self.name}: could not reconnect within {self.reconnect_timeout:.0f} s: {cause}",
                    reason=cause.reason,
                )
            )
            return
        delay, self._backoff = self._backoff, min(self._backoff * 2, _BACKOFF_MAX)
        log.warning("%s: reconnecting in %.1f s: %s", self.name, delay, cause)
        self._ioloop.call_later(delay, self._connect)

    def _die(self, error: TransportError) -> None:
        with self._cond:
            self._fatal = error
            self._cond.notify_all()
        for call in list(self._calls):
            call.finish(error=error)
        self._ioloop.stop()

    def _set_blocked(self, blocked: bool) -> None:
        if blocked:
            metrics.BROKER_BLOCKED.inc()
        with self._cond:
            self._blocked = blocked
            self._cond.notify_all()

    def _shutdown(self) -> None:
        self._closing = True
        if self._connection is not None and self._connection.is_open:
            self._connection.close()
        else:
            self._ioloop.stop()

    # I/O thread: publishing ---------------------------------------------------------------------------------
    def _open_publish_channel(self) -> None:
        assert self._connection is not None
        self._connection.channel(on_open_callback=self._on_publish_channel)

    def _on_publish_channel(self, channel: Channel) -> None:
        channel.add_on_close_callback(self._on_publish_channel_closed)
        channel.add_on_return_callback(self._on_return)
        channel.confirm_delivery(self._on_confirm, callback=lambda _f: self._publish_channel_ready(channel))

    def _publish_channel_ready(self, channel: Channel) -> None:
        self._pub_channel = channel
        self._pub_generation += 1
        self._tags.clear()
        self._next_tag = 1
        with self._cond:
            self._pub_ready = True
            pending = list(self._outgoing.values())
            self._cond.notify_all()
        for out in pending:
            self._send(out)

    def _send(self, out: _Outgoing) -> None:
        """Publish (or publish again) a windowed message on the current channel unless it is there already."""
        channel = self._pub_channel
        if (
            channel is None
            or not channel.is_open
            or out.done
            or out.channel_generation == self._pub_generation
        ):
            return
        try:
            frame = out.properties.encode()  # what basic_publish would fail on, killing the I/O thread
        except (struct.error, TypeError, ValueError, OverflowError, pika.exceptions.AMQPError) as exc:
            self._finish(out, TransportError(f"headers that cannot be encoded: {exc!r}", reason="bad_header"))
            return
        del frame
        out.channel_generation = self._pub_generation
        self._tags[self._next_tag] = out
        self._next_tag += 1
        channel.basic_publish(out.exchange, out.routing_key, out.body, out.properties, mandatory=True)

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        tags = (
            [t for t in self._tags if t <= method.delivery_tag] if method.multiple else [method.delivery_tag]
        )
        nack = isinstance(method, pika.spec.Basic.Nack)
        for tag in tags:
            out = self._tags.pop(tag, None)
            if out is None:
                continue
            if nack:
                self._on_nack(out)
            elif out.returned is not None:
                self._finish(out, TransportError(out.returned, reason="unroutable"))
            else:
                metrics.CONFIRM_LATENCY.observe(time.monotonic() - out.created)
                self._finish(out, None)

    def _on_nack(self, out: _Outgoing) -> None:
        """Retry with backoff: a queue at its length limit nacks until a consumer drains it."""
        now = time.monotonic()
        out.first_nack = out.first_nack or now
        if now - out.first_nack > self.full_queue_timeout:
            message = f"broker nacked {out.exchange}/{out.routing_key} for {self.full_queue_timeout:.0f} s"
            self._finish(out, TransportError(message, reason="nacked"))
            return
        attempts = (now - out.first_nack) / _NACK_BACKOFF_MAX
        delay = min(_NACK_BACKOFF_FIRST * 2 ** min(attempts, 10), _NACK_BACKOFF_MAX)
        out.channel_generation = -1
        self._ioloop.call_later(delay, lambda: self._send(out))

    def _on_return(self, _channel: Channel, method: Any, properties: Any, _body: bytes) -> None:
        number = int(str(properties.message_id).rsplit("/", 1)[-1])
        with self._cond:
            out = self._outgoing.get(number)
        if out is not None:
            out.returned = f"unroutable: {method.exchange!r} / {method.routing_key!r} ({method.reply_text})"

    def _finish(self, out: _Outgoing, error: TransportError | None) -> None:
        with self._cond:
            out.done, out.error = True, error
            if self._outgoing.pop(out.number, None) is not None:
                self._in_flight_bytes -= len(out.body)
            if error is not None:
                self._errors.append(error)
            elif out.dead_letter_of is not None:
                delivery, reason = out.dead_letter_of
                metrics.DEAD_LETTERED.labels(self.role, reason).inc()
                self._count_unacked(delivery.queue, -1)
                channel, delivery_tag, _ = delivery.tag
                self._ack(channel, delivery_tag, False)  # on the I/O thread already
            metrics.IN_FLIGHT.set(len(self._outgoing))
            self._cond.notify_all()

    def _on_publish_channel_closed(self, channel: Channel, exc: BaseException) -> None:
        """A channel the broker closed (access refused, missing exchange) fails the messages sent on it.

        Which of them caused it is unknown, so none is retried silently; the connection and later publishes
        go on.
        """
        if channel is not self._pub_channel:
            return
        self._pub_channel = None
        with self._cond:
            self._pub_ready = False
        if not isinstance(exc, pika.exceptions.ChannelClosedByBroker):
            return  # the connection is going away; _connection_lost republishes
        error = _error_from(exc, "publish channel closed by the broker")
        for out in list(self._tags.values()):
            self._finish(out, error)
        self._tags.clear()
        if self._connection is not None and self._connection.is_open:
            self._open_publish_channel()

    # I/O thread: consuming ----------------------------------------------------------------------------------
    def _start_consumer(self, spec: _ConsumerSpec, call: _Call | None) -> None:
        assert self._connection is not None

        def on_close(_channel: Channel, exc: BaseException) -> None:
            error = _error_from(exc, f"consume {spec.queue}")
            if spec.exclusive and error.reason == "access_refused":
                error = TransportError(exclusive_refusal(spec.queue), reason="exclusive")
                if call is None and self._retry_exclusive(spec, error):
                    return
            if call is not None and not call.event.is_set():  # refused at once: consume() raises it
                call.finish(error=error)
                return
            if isinstance(exc, pika.exceptions.ChannelClosedByBroker) and spec.channel is not None:
                self._consumer_failed(
                    spec, _error_from(exc, f"consumer of {spec.queue} closed by the broker")
                )

        def on_consume_ok(_frame: Any) -> None:
            spec.refused_since = None
            if call is not None:
                call.finish()

        def on_open(channel: Channel) -> None:
            channel.add_on_close_callback(on_close)
            channel.add_on_cancel_callback(lambda _f: self._consumer_failed(spec, self._cancelled(spec)))
            arguments = dict(spec.arguments)
            if spec.next_stream_offset is not None:
                arguments["x-stream-offset"] = spec.next_stream_offset
            on_message = self._message_handler(spec, channel)
            channel.basic_qos(
                prefetch_count=spec.prefetch,
                callback=lambda _f: channel.basic_consume(
                    spec.queue,
                    on_message,
                    exclusive=spec.exclusive,
                    consumer_tag=spec.tag,
                    arguments=arguments,
                    callback=on_consume_ok,
                ),
            )
            spec.channel = channel

        self._connection.channel(on_open_callback=on_open)

    def _retry_exclusive(self, spec: _ConsumerSpec, error: TransportError) -> bool:
        """After a reconnect, the broker may still hold this worker's previous connection (and its exclusive
        consumer) until it notices that connection is gone: retry for ``reconnect_timeout`` seconds."""
        now = time.monotonic()
        spec.refused_since = spec.refused_since or now
        if now - spec.refused_since > self.reconnect_timeout or spec.tag not in self._consumers:
            return False
        spec.channel = None
        log.warning("%s: %s; retrying in %.0f s", self.name, error, _BACKOFF_MAX)
        self._ioloop.call_later(_BACKOFF_MAX, lambda: self._resume_consumer(spec))
        return True

    def _resume_consumer(self, spec: _ConsumerSpec) -> None:
        if self._connection is not None and self._connection.is_open and spec.tag in self._consumers:
            self._start_consumer(spec, None)

    def _cancelled(self, spec: _ConsumerSpec) -> TransportError:
        return TransportError(
            f"the broker cancelled the consumer of {spec.queue} (queue deleted?)", reason="cancelled"
        )

    def _consumer_failed(self, spec: _ConsumerSpec, error: TransportError) -> None:
        with self._cond:
            if self._consumers.pop(spec.tag, None) is not None:
                self._errors.append(error)
                self._cond.notify_all()

    def _message_handler(self, spec: _ConsumerSpec, channel: Channel) -> Callable[..., None]:
        def on_message(_channel: Channel, method: Any, properties: Any, body: bytes) -> None:
            delivery = Delivery(
                queue=spec.queue,
                body=body,
                headers=dict(properties.headers or {}),
                routing_key=method.routing_key,
                user_id=properties.user_id,
                redelivered=bool(method.redelivered),
                tag=(channel, method.delivery_tag, spec.tag),
            )
            with self._cond:
                self._deliveries.append(delivery)
                self._cond.notify_all()

        return on_message

    def _stop_consumer(self, spec: _ConsumerSpec, call: _Call) -> None:
        """Closing the consumer's channel returns its unacked deliveries to the queue (as ``cancel`` says)."""
        channel, spec.channel = spec.channel, None
        if channel is None or not channel.is_open:
            call.finish()
            return
        channel.add_on_close_callback(lambda _c, _e: call.finish())
        channel.close()

    def _ack(self, channel: Channel, delivery_tag: int, multiple: bool) -> None:
        if channel.is_open:  # a delivery of a dead channel is redelivered by the broker; its ack is moot
            channel.basic_ack(delivery_tag, multiple=multiple)

    # I/O thread: tracked publishes -------------------------------------------------------------------------
    def _start_probe(self, stream: str, probe: _Probe, call: _Call) -> None:
        assert self._connection is not None

        def on_message(channel: Channel, method: Any, properties: Any, _body: bytes) -> None:
            headers = properties.headers or {}
            if headers.get(TRACK_HEADER) == probe.token and "x-stream-offset" in headers:
                probe.offset = int(headers["x-stream-offset"])
                probe.seen.set()
            elif channel.is_open:
                channel.basic_ack(method.delivery_tag)

        def on_open(channel: Channel) -> None:
            probe.channel = channel

            def on_close(_channel: Channel, exc: BaseException) -> None:
                call.finish(error=_error_from(exc, f"track {stream}"))
                probe.seen.set()  # nothing more will come by

            channel.add_on_close_callback(on_close)
            channel.basic_qos(
                prefetch_count=1,
                callback=lambda _f: channel.basic_consume(
                    stream,
                    on_message,
                    arguments={"x-stream-offset": "next"},
                    callback=lambda _f: call.finish(),
                ),
            )

        self._connection.channel(on_open_callback=on_open)

    def _stop_probe(self, probe: _Probe, call: _Call) -> None:
        channel, probe.channel = probe.channel, None
        if channel is None or not channel.is_open:
            call.finish()
            return
        channel.add_on_close_callback(lambda _c, _e: call.finish())
        channel.close()

    # I/O thread: topology -----------------------------------------------------------------------------------
    def _declare(self, spec: dict[str, Any], call: _Call) -> None:
        """Declare every exchange, queue and binding in turn on a short-lived channel."""
        assert self._connection is not None
        steps: list[Callable[[Channel, Callable[[Any], None]], None]] = []
        steps += [partial(_declare_exchange, exchange) for exchange in spec["exchanges"]]
        steps += [partial(_declare_queue, queue) for queue in spec["queues"]]
        steps += [partial(_bind, binding) for binding in spec["bindings"]]
        remaining = deque(steps)

        def next_step(channel: Channel) -> None:
            if not remaining:
                channel.close()
                call.finish()
                return
            remaining.popleft()(channel, lambda _f: next_step(channel))

        def on_open(channel: Channel) -> None:
            channel.add_on_close_callback(lambda _c, exc: call.finish(error=_error_from(exc, "declare")))
            next_step(channel)

        self._connection.channel(on_open_callback=on_open)

    def _queue_consumers(self, name: str, call: _Call) -> None:
        """A passive declare on a channel of its own: the broker closes it with 404 when there is no queue."""
        assert self._connection is not None

        def on_closed(_channel: Channel, exc: BaseException) -> None:
            if getattr(exc, "reply_code", None) == 404:
                call.finish(result=None)
            else:
                call.finish(error=_error_from(exc, f"look up queue {name}"))

        def on_declared(channel: Channel, frame: Any) -> None:
            call.finish(result=int(frame.method.consumer_count))
            channel.close()

        def on_open(channel: Channel) -> None:
            channel.add_on_close_callback(on_closed)
            channel.queue_declare(name, passive=True, callback=lambda frame: on_declared(channel, frame))

        self._connection.channel(on_open_callback=on_open)


def _declare_exchange(exchange: dict[str, Any], channel: Channel, done: Callable[[Any], None]) -> None:
    channel.exchange_declare(
        exchange["name"],
        exchange["type"],
        durable=exchange["durable"],
        auto_delete=exchange["auto_delete"],
        internal=exchange["internal"],
        arguments=exchange["arguments"],
        callback=done,
    )


def _declare_queue(queue: dict[str, Any], channel: Channel, done: Callable[[Any], None]) -> None:
    channel.queue_declare(
        queue["name"],
        passive=queue.get("passive", False),
        durable=queue["durable"],
        auto_delete=queue["auto_delete"],
        arguments=queue["arguments"],
        callback=done,
    )


def _bind(binding: dict[str, Any], channel: Channel, done: Callable[[Any], None]) -> None:
    channel.queue_bind(binding["destination"], binding["source"], binding["routing_key"], callback=done)


def open_failure(exc: BaseException, where: str, user: str, vhost: str) -> tuple[TransportError, bool]:
    """Why a connection attempt failed, in one line with the fix, and whether retrying cannot help."""
    if isinstance(exc, pika.exceptions.ProbableAuthenticationError):
        message = (
            f"the broker at {where} refused the login of user {user!r}: wrong user or password "
            "(`fedq broker add-client NAME` or `add-aggregator NAME` prints a URL that works)"
        )
        return TransportError(message, reason="auth"), True
    if isinstance(exc, pika.exceptions.ProbableAccessDeniedError) and "limit" in _reply_text(exc):
        message = (
            f"the broker at {where} refused a connection of user {user!r}: {_reply_text(exc)} (a per-user "
            "limit: `fedq broker add-client --max-connections`; are other processes of this user running?)"
        )
        return TransportError(message, reason="limit"), True
    if isinstance(exc, pika.exceptions.ProbableAccessDeniedError):
        message = (
            f"user {user!r} may not open vhost {vhost!r} on {where} ({_reply_text(exc)}): create it with "
            f"`rabbitmqctl add_vhost {vhost}` or grant it: `rabbitmqctl set_permissions -p {vhost} {user}`"
        )
        return TransportError(message, reason="vhost"), True
    cause = _cause_of(exc, ssl.SSLCertVerificationError, socket.gaierror, ConnectionRefusedError, OSError)
    if isinstance(cause, ssl.SSLCertVerificationError):
        message = f"TLS certificate verification of {where} failed: {cause.verify_message or cause}"
        return TransportError(message, reason="tls"), True
    if isinstance(cause, socket.gaierror):
        host = where.rsplit(":", 1)[0]
        message = f"cannot resolve the broker host {host!r} ({cause.strerror}): check the URL's host"
        return TransportError(message, reason="dns"), True
    if isinstance(cause, ConnectionRefusedError):
        message = f"nothing accepts connections at {where} (connection refused): is RabbitMQ running there?"
        return TransportError(message, reason="refused"), False
    if cause is None and _cause_of(exc, pika.exceptions.IncompatibleProtocolError) is not None:
        message = f"the broker at {where} closed the connection during the AMQP handshake (still starting?)"
        return TransportError(message, reason="handshake"), False
    detail = _reply_text(exc) if not isinstance(cause, OSError) else (cause.strerror or repr(cause))
    return TransportError(f"cannot connect to {where}: {detail}", reason="unreachable"), False


def _reply_text(exc: BaseException) -> str:
    """The broker's own words, e.g. ``NOT_ALLOWED - vhost x not found``, else the exception."""
    for item in _chain(exc):
        text = getattr(item, "reply_text", None) or _REPLY_IN_TEXT.search(str(item))
        if text:
            return text if isinstance(text, str) else text[1]
    return repr(exc)


def _cause_of(exc: BaseException, *kinds: type[BaseException]) -> BaseException | None:
    """The first exception of the most specific of ``kinds`` found anywhere in pika's nested errors."""
    found = list(_chain(exc))
    for kind in kinds:
        for item in found:
            if isinstance(item, kind):
                return item
    return None


def _chain(exc: BaseException) -> list[BaseException]:
    """Every exception nested in ``exc``: pika wraps socket errors in args and in lists of attempts."""
    out: list[BaseException] = []
    seen: list[object] = [exc]
    while seen:
        item = seen.pop()
        if isinstance(item, BaseException):
            if any(item is o for o in out):
                continue
            out.append(item)
            seen.extend(item.args)
            seen.extend(getattr(item, "exceptions", None) or [])  # a connection workflow's attempts
            seen.append(getattr(item, "exception", None))  # a connector phase's error
            for attr in ("__cause__", "__context__"):
                if getattr(item, attr) is not None:
                    seen.append(getattr(item, attr))
        elif isinstance(item, list | tuple):
            seen.extend(item)
    return out

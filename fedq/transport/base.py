"""The transport interface: opaque bytes with headers, published with confirms and consumed with acks.

The rest of fedq depends on this interface only; ``rabbitmq.py`` (pika) and ``memory.py`` (an in-process
double with the same ack / dead-letter semantics, for unit tests of other layers) implement it. The transport
knows nothing of tensors or of the wire format.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fedq.topology import DEFAULT_MODELS_RETENTION_BYTES

if TYPE_CHECKING:
    from fedq.topology import Names

REASON_HEADER = "x-fedq-reason"
DETAIL_HEADER = "x-fedq-detail"
QUEUE_HEADER = "x-fedq-queue"
TRACK_HEADER = "x-fedq-track"  # marks a ``publish_tracked`` message so that its publisher recognises it
USER_HEADER = "x-fedq-user"  # the validated user_id of the refused message's sender


@dataclass
class Delivery:
    """One message handed to a consumer; ``ack`` or ``dead_letter`` it exactly once when its work is done."""

    queue: str
    body: bytes
    headers: dict[str, Any] = field(default_factory=dict)
    routing_key: str = ""
    user_id: str | None = None
    redelivered: bool = False
    tag: Any = None  # opaque to callers: (channel, delivery tag, consumer tag) for RabbitMQ


def dead_letter_headers(delivery: Delivery, reason: str, detail: str) -> dict[str, Any]:
    """The headers of a dead letter: the reason and where it came from, and nothing of the sender's own
    headers (they are untrusted: a value the AMQP client cannot encode again stopped dead-lettering)."""
    return {
        REASON_HEADER: reason,
        DETAIL_HEADER: detail[:1000],
        QUEUE_HEADER: delivery.queue,
        USER_HEADER: delivery.user_id or "",
    }


class Transport(abc.ABC):
    """A connection to the broker as the rest of fedq sees it."""

    @abc.abstractmethod
    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        headers: dict[str, Any] | None = None,
        persistent: bool = True,
    ) -> None:
        """Queue a message for publishing; block while the in-flight window (messages, bytes) is full.

        Returns once the message is inside the window, not when it is confirmed. Failures of earlier messages
        (broker nack after the retries, unroutable message returned) are raised here or by ``flush``.
        """

    @abc.abstractmethod
    def flush(self, timeout: float | None = None) -> None:
        """Wait until every published message is confirmed; raise ``TransportError`` on failure or timeout."""

    @abc.abstractmethod
    def consume(
        self, queue: str, *, prefetch: int, arguments: dict[str, Any] | None = None, exclusive: bool = False
    ) -> str:
        """Start consuming ``queue`` with at most ``prefetch`` unacknowledged deliveries; return its tag.

        ``exclusive``: no other consumer may consume the queue meanwhile (a ``TransportError`` with reason
        ``exclusive`` if one does): an aggregator shard's queues have one reader, so that two workers of
        the same shard cannot both take its updates.
        """

    @abc.abstractmethod
    def cancel(self, consumer_tag: str) -> None:
        """Stop a consumer started by ``consume``; its unacknowledged deliveries return to the queue."""

    @abc.abstractmethod
    def get(self, timeout: float | None = None) -> Delivery | None:
        """Next delivery from any consumer, or None after ``timeout`` seconds."""

    @abc.abstractmethod
    def ack(self, delivery: Delivery, *, multiple: bool = False) -> None:
        """Acknowledge a delivery (and, with ``multiple``, every earlier one of the same consumer channel)."""

    @abc.abstractmethod
    def dead_letter(self, delivery: Delivery, reason: str, detail: str = "") -> None:
        """Move a delivery to the dead-letter exchange with ``reason``/``detail`` headers, then drop it."""

    @abc.abstractmethod
    def publish_tracked(self, exchange: str, routing_key: str, body: bytes, *, stream: str) -> int:
        """Publish ``body`` (persistent, confirmed) to an exchange feeding ``stream``; return its offset.

        Readers then attach at exactly that offset instead of a timestamp (1-second resolution), so a reader
        of a version reads that version, not the messages published in the second before it.
        """

    @abc.abstractmethod
    def declare(
        self,
        names: Names,
        shards: int,
        *,
        quorum: bool = False,
        models_retention_bytes: int = DEFAULT_MODELS_RETENTION_BYTES,
    ) -> None:
        """Declare the federation's exchanges, queues and bindings exactly as ``topology.definitions`` lists.

        Idempotent; declaring with different arguments than an existing queue has is a ``TransportError``,
        except for the streams' retention: a stream declared beforehand (by an operator, with other limits) is
        used as it is, with a warning, since only retention differs and a version that it cut is reported to
        its reader as such.
        """

    @abc.abstractmethod
    def queue_consumers(self, name: str) -> int | None:
        """How many consumers the queue ``name`` has, None when there is no such queue (a passive declare,
        which needs no permission on it): lets a worker compare its topology with the one declared and run."""

    @abc.abstractmethod
    def close(self) -> None:
        """Flush what is in flight and close the connection."""

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def exclusive_refusal(queue: str) -> str:
    """The one line an operator gets when a second worker tries to consume a shard's queue."""
    return (
        f"queue {queue} is already consumed by another worker (an aggregator of this shard running "
        "elsewhere? `fedq status` lists each queue's consumers); one aggregator per shard"
    )

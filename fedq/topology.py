"""Exchange and queue names, and the arguments every fedq queue is declared with.

One function (``definitions``) describes the topology; ``fedq broker apply`` sends it to the broker's
management API, ``broker_config/definitions.json`` is generated from it, and workers declare exactly the same
at start-up, so a broker set up either way works. A ``namespace`` prefixes every name so tests (and several
federations) can share a broker without seeing each other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from fedq.errors import ConfigError

DEFAULT_NAMESPACE = "fedq"
DEFAULT_CHUNK_BYTES = 4 << 20
# Seconds of silence after which a receiver gives up on a stream.
DEFAULT_TIMEOUT = 120.0
# An update queue this full makes publishers wait (reject-publish): it bounds broker memory and disk.
DEFAULT_MAX_QUEUE_BYTES = 512 << 20
# The floor of the models stream's retention; an aggregator raises it to fit its model (see below).
DEFAULT_MODELS_RETENTION_BYTES = 4 << 30
VERSIONS_RETENTION_BYTES = 16 << 20
# A quorum update queue dead-letters a message delivered this many times unacked (``x-delivery-limit``): one
# that ends the aggregator's process (or its connection) at every delivery stops it only that often. An
# aggregator killed this many times in a row with a message in flight loses that message (to the dead-letter
# queue, where its client's loss shows): restarts that fast are a crash loop, not an outage.
DELIVERY_LIMIT = 10
# Streams are trimmed a whole segment at a time, so segments are kept small relative to the retention.
MODELS_SEGMENT_BYTES = 64 << 20
VERSIONS_SEGMENT_BYTES = 1 << 20
_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class Names:
    """The names of one federation's exchanges and queues."""

    namespace: str = DEFAULT_NAMESPACE

    @property
    def updates_exchange(self) -> str:
        """Clients publish update messages here, routing key ``shard_key(i)``."""
        return f"{self.namespace}.updates"

    def shard_key(self, shard: int) -> str:
        return f"shard.{shard}"

    def updates_queue(self, shard: int) -> str:
        return f"{self.namespace}.updates.shard.{shard}"

    @property
    def control_exchange(self) -> str:
        """Aggregator shards coordinate version steps here (routing key ``shard_key(i)``)."""
        return f"{self.namespace}.control"

    def control_queue(self, shard: int) -> str:
        return f"{self.namespace}.control.shard.{shard}"

    @property
    def models_exchange(self) -> str:
        """Aggregators publish global model versions here; it feeds the models stream. Its name differs from
        the stream's, so a client's read permission (the streams' names exactly) does not cover it: a client
        can bind nothing from it (an exchange-to-exchange binding needs read on its source)."""
        return f"{self.namespace}.models.in"

    @property
    def models_stream(self) -> str:
        """A RabbitMQ stream holding the last few model versions; clients read it from any offset."""
        return f"{self.namespace}.models"

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.namespace}.dlx"

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.namespace}.dead-letter"


def versions_names(names: Names) -> tuple[str, str]:
    """The exchange and stream that carry one small announcement per completed model version.

    Clients read this stream from its last entry to learn the newest version (and the models-stream timestamp
    where its chunks begin) without scanning the large models stream.
    """
    return f"{names.namespace}.versions.in", f"{names.namespace}.versions"


# Versions as deltas (fedq.reconstruction): an fp32 snapshot of what clients hold every this many versions.
# Ten: a late joiner reads one snapshot and at most nine deltas (nf4: 9 x 14% of fp32), and the snapshots'
# share of the publishing (one fp32 model per ten versions) stays below the deltas'.
DEFAULT_SNAPSHOT_EVERY = 10


def models_retention_bytes(version_bytes: int, delta_bytes: int = 0, deltas: int = 0) -> int:
    """The models stream's retention for versions of ``version_bytes`` (fp32 bytes of the whole model).

    Two whole versions, each with a segment of slack (streams trim whole segments): the newest version stays
    readable in full while the next one is written, whatever the model's size. With versions as deltas
    (``fedq.reconstruction``), the two whole versions are snapshots, and ``deltas`` deltas of at most
    ``delta_bytes`` each come on top. A reader slower than that finds its version gone and is told so
    (``Client.receive``); it reads the newer one instead. Never below the default, so small federations keep
    several versions.
    """
    whole = 2 * (_wire_bytes(version_bytes) + MODELS_SEGMENT_BYTES)
    return max(
        DEFAULT_MODELS_RETENTION_BYTES, whole + deltas * (_wire_bytes(delta_bytes) + MODELS_SEGMENT_BYTES)
    )


def _wire_bytes(payload_bytes: int) -> int:
    return payload_bytes + payload_bytes // 64  # headers and checksums: well under 1/64 of 4 MiB chunks


def with_passive_stream(spec: dict[str, Any], queue: str) -> dict[str, Any] | None:
    """The same definitions with stream ``queue`` checked for existence only (a passive declaration); None
    when ``queue`` is not one of its streams or is passive already.

    For a broker where a stream was declared beforehand with other limits: declaring it with ours would fail
    (``PRECONDITION_FAILED``), and its limits only decide how long old versions stay readable.
    """
    changed = False
    queues = []
    for item in spec["queues"]:
        is_stream = item["arguments"].get("x-queue-type") == "stream"
        if item["name"] == queue and is_stream and "passive" not in item:
            item, changed = {**item, "passive": True}, True
        queues.append(item)
    return {**spec, "queues": queues} if changed else None


def namespace_of(queue: str) -> str:
    """The namespace of a fedq queue: the transport finds ``{ns}.dlx`` for any queue it reads with it."""
    match = re.match(r"^(.+)\.(updates\.shard\.\d+|control\.shard\.\d+|models|versions|dead-letter)$", queue)
    if match is None:
        raise ConfigError(f"{queue!r} is not a fedq queue name", reason="queue_name")
    return match.group(1)


def definitions(
    names: Names,
    shards: int,
    *,
    quorum: bool = False,
    max_queue_bytes: int = DEFAULT_MAX_QUEUE_BYTES,
    models_retention_bytes: int = DEFAULT_MODELS_RETENTION_BYTES,
    vhost: str = "/",
) -> dict[str, Any]:
    """The whole topology in RabbitMQ's definitions.json format (what ``POST /api/definitions`` accepts).

    ``quorum`` makes the update, control and dead-letter queues quorum queues (replicated; for clusters);
    streams are replicated anyway. Quorum update queues dead-letter a poison message after ``DELIVERY_LIMIT``
    deliveries (classic queues cannot: there the aggregator's tolerant decoding is the only defence). Every
    queue names its type explicitly so that a declaration and an import compare equal.
    """
    if shards < 1:
        raise ConfigError(f"shards must be >= 1, got {shards}", reason="shards")
    if not _NAMESPACE_RE.match(names.namespace):
        raise ConfigError(
            f"namespace must match {_NAMESPACE_RE.pattern}, got {names.namespace!r}", reason="namespace"
        )
    queue_type = "quorum" if quorum else "classic"
    dlx = names.dead_letter_exchange
    versions_exchange, versions_stream = versions_names(names)
    exchanges = [
        _exchange(names.updates_exchange, "direct", vhost),
        _exchange(names.control_exchange, "direct", vhost),
        _exchange(names.models_exchange, "fanout", vhost),
        _exchange(versions_exchange, "fanout", vhost),
        _exchange(dlx, "fanout", vhost),
    ]
    bounded = {
        "x-queue-type": queue_type,
        "x-max-length-bytes": max_queue_bytes,
        "x-overflow": "reject-publish",
        "x-dead-letter-exchange": dlx,
    }
    if quorum:
        bounded["x-delivery-limit"] = DELIVERY_LIMIT
    queues = []
    bindings = []
    for shard in range(shards):
        queues.append(_queue(names.updates_queue(shard), bounded, vhost))
        bindings.append(
            _binding(names.updates_exchange, names.updates_queue(shard), names.shard_key(shard), vhost)
        )
        queues.append(
            _queue(
                names.control_queue(shard), {"x-queue-type": queue_type, "x-dead-letter-exchange": dlx}, vhost
            )
        )
        bindings.append(
            _binding(names.control_exchange, names.control_queue(shard), names.shard_key(shard), vhost)
        )
    queues.append(_queue(names.models_stream, _stream(models_retention_bytes, MODELS_SEGMENT_BYTES), vhost))
    bindings.append(_binding(names.models_exchange, names.models_stream, "", vhost))
    queues.append(_queue(versions_stream, _stream(VERSIONS_RETENTION_BYTES, VERSIONS_SEGMENT_BYTES), vhost))
    bindings.append(_binding(versions_exchange, versions_stream, "", vhost))
    # The dead-letter queue drops its oldest entries when full: a flood of bad messages must not stop it.
    dead = {"x-queue-type": queue_type, "x-max-length-bytes": max_queue_bytes}
    queues.append(_queue(names.dead_letter_queue, dead, vhost))
    bindings.append(_binding(dlx, names.dead_letter_queue, "", vhost))
    return {"vhosts": [{"name": vhost}], "exchanges": exchanges, "queues": queues, "bindings": bindings}


def _exchange(name: str, kind: str, vhost: str) -> dict[str, Any]:
    return {
        "name": name,
        "vhost": vhost,
        "type": kind,
        "durable": True,
        "auto_delete": False,
        "internal": False,
        "arguments": {},
    }


def _queue(name: str, arguments: dict[str, Any], vhost: str) -> dict[str, Any]:
    return {"name": name, "vhost": vhost, "durable": True, "auto_delete": False, "arguments": dict(arguments)}


def _stream(max_bytes: int, segment_bytes: int) -> dict[str, Any]:
    return {
        "x-queue-type": "stream",
        "x-max-length-bytes": max_bytes,
        "x-stream-max-segment-size-bytes": segment_bytes,
    }


def _binding(source: str, queue: str, routing_key: str, vhost: str) -> dict[str, Any]:
    return {
        "source": source,
        "vhost": vhost,
        "destination": queue,
        "destination_type": "queue",
        "routing_key": routing_key,
        "arguments": {},
    }

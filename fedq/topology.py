"""Exchange and queue names, and the arguments every fedq queue is declared with.

One function (``definitions``) describes the topology; ``fedq broker apply`` sends it to the broker's management
API, ``broker_config/definitions.json`` is generated from it, and workers declare exactly the same at start-up, so a
broker set up either way works. A ``namespace`` prefixes every name so tests (and several federations) can share a
broker without seeing each other.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_NAMESPACE = "fedq"
DEFAULT_CHUNK_BYTES = 4 << 20


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
        """Aggregators publish global model versions here; it feeds the models stream."""
        return f"{self.namespace}.models"

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
    return f"{names.namespace}.versions", f"{names.namespace}.versions"

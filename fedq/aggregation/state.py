"""The persistent state of one aggregator shard: one object, saved with one call.

What a shard must remember across a restart besides its part of the model: the version, the streams and update
ids already finished (folded or refused, so their redelivered messages change nothing), the streams dropped as
expired (their late messages are dead-lettered), what was published and announced, the leader's pending
reports, and the last plan (so the leader can ask followers to report again). ``save`` writes the model file
of the current version if it is not on disk yet and then replaces ``state.json`` atomically (``checkpoint``):
the rename of ``state.json`` is the single commit point, whatever changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedq.aggregation import checkpoint
from fedq.protocol import Plan


@dataclass
class ShardState:
    shard: int
    shards: int
    version: int = 0
    finished: set[str] = field(default_factory=set)  # streams folded or refused: their messages are no-ops
    finished_updates: set[str] = field(default_factory=set)  # update ids folded or refused
    expired: set[str] = field(default_factory=set)  # streams dropped for inactivity: late parts dead-lettered
    published: int = -1  # the last version published on the models stream
    published_offset: int = 0  # the models-stream offset where it begins (clients read from there)
    announced: int = -1  # the leader: the last version announced on the versions stream
    planner: dict[str, Any] = field(default_factory=dict)  # the leader: Planner.state()
    last_plan: Plan | None = None

    def save(
        self,
        directory: Path,
        model: dict[str, torch.Tensor],
        *,
        record: dict[str, Any] | None = None,
        keep: int = 1,
    ) -> None:
        """Make this state (and ``model`` as the model of ``version``, described by ``record``) the shard's
        durable checkpoint, keeping the newest ``keep`` versions on disk."""
        checkpoint.save(directory, self.version, model, self.to_json(), record=record, keep=keep)

    def to_json(self) -> dict[str, Any]:
        return {
            "shard": self.shard,
            "shards": self.shards,
            "finished": sorted(self.finished),
            "finished_updates": sorted(self.finished_updates),
            "expired": sorted(self.expired),
            "published": self.published,
            "published_offset": self.published_offset,
            "announced": self.announced,
            "planner": self.planner,
            "last_plan": self.last_plan.to_json() if self.last_plan else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShardState:
        return cls(
            shard=data["shard"],
            shards=data["shards"],
            version=data["version"],
            finished=set(data["finished"]),
            finished_updates=set(data["finished_updates"]),
            expired=set(data.get("expired", [])),
            published=data["published"],
            published_offset=data["published_offset"],
            announced=data.get("announced", -1),
            planner=data.get("planner", {}),
            last_plan=Plan.from_json(data["last_plan"]) if data.get("last_plan") else None,
        )


def load(directory: Path, device: torch.device) -> tuple[dict[str, torch.Tensor], ShardState] | None:
    """The shard's last checkpoint (model on ``device``, state), or None for a fresh shard."""
    loaded = checkpoint.load(directory, device)
    if loaded is None:
        return None
    model, data = loaded
    return model, ShardState.from_json(data)

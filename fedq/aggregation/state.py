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

MAX_REMEMBERED = 20_000  # finished streams (or update ids, or expired streams) kept at most


@dataclass
class ShardState:
    shard: int
    shards: int
    version: int = 0
    # What was finished, each with the version it was finished at (``forget`` drops the old ones):
    finished: dict[str, int] = field(default_factory=dict)  # streams folded or refused: their messages no-ops
    finished_updates: dict[str, int] = field(default_factory=dict)  # update ids folded or refused
    expired: dict[str, int] = field(default_factory=dict)  # streams dropped as incomplete: late parts refused
    published: int = -1  # the last version published on the models stream
    published_offset: int = 0  # the models-stream offset where it begins (clients read from there)
    # versions as deltas (fedq.reconstruction): where the published version's delta and snapshot begin (-1:
    # none), and the leader's announced chain: the newest snapshot and the deltas since, as [version, offset]
    delta_offset: int = -1
    snapshot_offset: int = -1
    snapshot: tuple[int, int] | None = None
    deltas: list[tuple[int, int]] = field(default_factory=list)
    announced: int = -1  # the leader: the last version announced on the versions stream
    planner: dict[str, Any] = field(default_factory=dict)  # the leader: Planner.state()
    last_plan: Plan | None = None
    all_shapes: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)  # every shard's tensors
    dtype_limits: dict[str, float] = field(default_factory=dict)  # the initial model's dtypes' largest values
    initial_digest: str = ""  # this shard's digest of version 0 (fedq.initial_digest; "": older checkpoint)

    def finish(self, what: dict[str, int], key: str) -> None:
        what.setdefault(key, self.version)

    def forget(self, keep_versions: int, most: int = MAX_REMEMBERED) -> None:
        """Forget what was finished more than ``keep_versions`` versions ago, and beyond the ``most`` recent
        entries of each kind, so the state stays bounded whatever clients send. Safe: a redelivery comes
        within minutes, and an update id forgotten after ``max_staleness`` versions can only come back
        stale."""
        for remembered in (self.finished, self.finished_updates, self.expired):
            old = [k for k, v in remembered.items() if v < self.version - keep_versions]
            for key in old:
                del remembered[key]
            if len(remembered) > most:
                for key in sorted(remembered, key=lambda k: remembered[k])[: len(remembered) - most]:
                    del remembered[key]

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
            "finished": dict(sorted(self.finished.items())),
            "finished_updates": dict(sorted(self.finished_updates.items())),
            "expired": dict(sorted(self.expired.items())),
            "published": self.published,
            "published_offset": self.published_offset,
            "delta_offset": self.delta_offset,
            "snapshot_offset": self.snapshot_offset,
            "snapshot": list(self.snapshot) if self.snapshot is not None else None,
            "deltas": [list(d) for d in self.deltas],
            "announced": self.announced,
            "planner": self.planner,
            "last_plan": self.last_plan.to_json() if self.last_plan else None,
            "all_shapes": [[name, list(shape)] for name, shape in self.all_shapes],
            "dtype_limits": self.dtype_limits,
            "initial_digest": self.initial_digest,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShardState:
        return cls(
            shard=data["shard"],
            shards=data["shards"],
            version=data["version"],
            finished=_remembered(data["finished"], data["version"]),
            finished_updates=_remembered(data["finished_updates"], data["version"]),
            expired=_remembered(data.get("expired", {}), data["version"]),
            published=data["published"],
            published_offset=data["published_offset"],
            delta_offset=data.get("delta_offset", -1),
            snapshot_offset=data.get("snapshot_offset", -1),
            snapshot=(int(data["snapshot"][0]), int(data["snapshot"][1])) if data.get("snapshot") else None,
            deltas=[(int(v), int(o)) for v, o in data.get("deltas", [])],
            announced=data.get("announced", -1),
            planner=data.get("planner", {}),
            last_plan=Plan.from_json(data["last_plan"]) if data.get("last_plan") else None,
            all_shapes=[(str(n), tuple(int(d) for d in s)) for n, s in data.get("all_shapes", [])],
            dtype_limits={str(n): float(v) for n, v in data.get("dtype_limits", {}).items()},
            initial_digest=str(data.get("initial_digest", "")),
        )


def _remembered(data: dict[str, int] | list[str], version: int) -> dict[str, int]:
    """A remembered set from state.json (a list in checkpoints older than the versions it now keeps)."""
    return dict(data) if isinstance(data, dict) else dict.fromkeys(data, version)


def load(directory: Path, device: torch.device) -> tuple[dict[str, torch.Tensor], ShardState] | None:
    """The shard's last checkpoint (model on ``device``, state), or None for a fresh shard."""
    loaded = checkpoint.load(directory, device)
    if loaded is None:
        return None
    model, data = loaded
    return model, ShardState.from_json(data)

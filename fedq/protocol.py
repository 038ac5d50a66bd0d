"""Every message between clients and aggregators, defined once: built here, parsed and validated here.

The wire format (``fedq.wire``) frames bytes and the container streams (``fedq.streaming``) carry tensors;
this module owns what those frames *mean* between the two sides of a federation:

- **stream ids**: an update's container stream per shard, a model version's stream per shard, a version's
  announcement;
- **update metadata**: what a client's update manifest says besides its tensors (``UpdateMeta``);
- **announcements**: the small message on the versions stream that tells clients a version is ready;
- **control messages** between aggregator shards: ``Committed``, ``Folded``, ``Stepped`` and ``GramPart``
  reports to the leader, and the leader's ``Plan``, ``Commit``, ``Abort`` and ``Measure`` requests.

Everything that arrives is untrusted: each ``parse`` checks types and bounds and raises a typed error with
a reason slug (``RejectedUpdate`` "bad_manifest" for update metadata, ``StreamError`` "bad_announcement" /
"bad_control" for the others), never ``KeyError`` or ``TypeError``. Builders are the only places that write
these fields, so a field renamed here is renamed for both sides.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from fedq import wire
from fedq.errors import RejectedUpdate, StreamError, WireError

UPDATE_KINDS = ("delta", "full")
# what ``Announcement.initial`` hashes (``fedq.initial_digest``); bumped when that changes, so that a client
# never compares against a digest defined otherwise (it downloads instead)
INITIAL_SCHEME = 1
MAX_ANNOUNCED_CONTRIBUTORS = 10_000  # rows a reader takes from one announcement
# Client metrics become Prometheus label values: bounded so that no client can blow up the label cardinality.
MAX_CLIENT_METRICS = 8  # metric names per update (and per client and process lifetime, see the aggregator)
METRIC_NAME = re.compile(r"[a-z_][a-z0-9_]{0,31}")


# stream ids -------------------------------------------------------------------------------------------------
def update_stream(client: str, update_id: str, shard: int) -> str:
    """The container stream of one shard's part of an update."""
    return f"{client}/{update_id}/s{shard}"


def model_stream(version: int, shard: int) -> str:
    """The container stream of one shard's part of a model version on the models stream."""
    return f"model/v{version}/s{shard}"


def delta_stream(version: int, shard: int) -> str:
    """The container stream of one shard's delta from version - 1 to ``version`` (``fedq.reconstruction``)."""
    return f"model/v{version}/s{shard}/delta"


def version_stream(version: int) -> str:
    """The stream id of a version's announcement on the versions stream."""
    return f"version/v{version}"


# update metadata --------------------------------------------------------------------------------------------
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class UpdateMeta:
    """What an update's manifest says besides its tensors (the ``meta`` of ``streaming.Manifest``).

    ``client`` is informative only: the aggregator attributes an update to the broker-validated ``user_id`` of
    its messages, never to this field.
    """

    update_id: str
    base_version: int
    num_samples: int = 1
    kind: str = "delta"
    metrics: dict[str, float] = field(default_factory=dict)
    client: str | None = None
    # tensors in the whole update, over all shards. A shard may get an empty stream of a non-empty update
    # (every shard must commit an update before it folds, so a client sends each shard its container), so
    # whether an update is empty is judged on this count, not on one shard's stream.
    update_tensors: int | None = None

    def to_meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "update_id": self.update_id,
            "base_version": self.base_version,
            "kind": self.kind,
            "num_samples": self.num_samples,
        }
        if self.client is not None:
            meta["client"] = self.client
        if self.metrics:
            meta["metrics"] = dict(self.metrics)
        if self.update_tensors is not None:
            meta["update_tensors"] = self.update_tensors
        return meta

    @classmethod
    def parse(cls, meta: Mapping[str, Any]) -> UpdateMeta:
        """The update metadata of an untrusted manifest, type-checked; RejectedUpdate("bad_manifest")."""
        update_id, base, samples = meta.get("update_id"), meta.get("base_version"), meta.get("num_samples", 1)
        kind = meta.get("kind", "delta")
        if not isinstance(update_id, str) or not update_id:
            raise RejectedUpdate("manifest has no update_id", reason="bad_manifest")
        if (
            not (isinstance(base, int) and isinstance(samples, int))
            or not _is_int(base)
            or not _is_int(samples)
        ):
            raise RejectedUpdate(
                "manifest base_version/num_samples must be non-negative integers", reason="bad_manifest"
            )
        if base < 0 or samples < 0:
            raise RejectedUpdate(
                "manifest base_version/num_samples must be non-negative integers", reason="bad_manifest"
            )
        if kind not in UPDATE_KINDS:
            raise RejectedUpdate(f"update kind {kind!r:.40}: expected delta or full", reason="bad_manifest")
        raw_metrics = meta.get("metrics") or {}
        if not isinstance(raw_metrics, dict):
            raise RejectedUpdate("manifest metrics must be a map", reason="bad_manifest")
        client = meta.get("client")
        tensors = meta.get("update_tensors")
        if tensors is not None and not (isinstance(tensors, int) and _is_int(tensors) and tensors >= 0):
            raise RejectedUpdate(
                "manifest update_tensors must be a non-negative integer", reason="bad_manifest"
            )
        return cls(
            update_id,
            base,
            samples,
            kind,
            _clean_metrics(raw_metrics),
            client if isinstance(client, str) else None,
            tensors,
        )


def _clean_metrics(raw: dict[Any, Any]) -> dict[str, float]:
    """At most ``MAX_CLIENT_METRICS`` finite numbers under names that are valid metric label values; the rest
    is ignored (a client's metrics are informative: a bad one does not cost the update)."""
    clean: dict[str, float] = {}
    for k, v in raw.items():
        if len(clean) >= MAX_CLIENT_METRICS:
            break
        if (
            isinstance(k, str)
            and METRIC_NAME.fullmatch(k)
            and isinstance(v, int | float)
            and not isinstance(v, bool)
            and math.isfinite(v)
        ):
            clean[k] = float(v)
    return clean


# model streams and announcements ----------------------------------------------------------------------------
def model_meta(version: int, shard: int, shards: int, config: Mapping[str, Any]) -> dict[str, Any]:
    """The caller meta of a model stream's manifest."""
    return {"version": version, "shard": shard, "shards": shards, "config": dict(config)}


@dataclass(frozen=True)
class Announcement:
    """Version ``version`` is complete on the models stream from offset ``models_offset`` on (its first
    message: readers attach there and read nothing older)."""

    version: int
    shards: int
    models_offset: int
    tensors: list[tuple[str, tuple[int, ...]]]
    strategy: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    # the last version of a run with --max-versions: clients stop instead of waiting for another
    final: bool = False
    # who made it (``contributors``): shown by ``fedq status``, written into ``fedq receive``'s file
    contributors: list[dict[str, Any]] = field(default_factory=list)
    # Versions as deltas (``fedq.reconstruction``): the newest snapshot of x̂ (version, offset of its first
    # message) and the deltas still announced (version, offset), oldest first, the last one this version's.
    # None for whole versions (the container streams ``model_stream(version, shard)`` at ``models_offset``).
    snapshot: tuple[int, int] | None = None
    deltas: list[tuple[int, int]] = field(default_factory=list)
    # The digest of version 0 per shard (``fedq.initial_digest``): a client that holds it takes version 0 from
    # its own model. None where an aggregator does not announce it (older ones) or in a scheme this reader
    # does not know: the client downloads.
    initial: list[str] | None = None

    def encode(self) -> bytes:
        meta = {
            "version": self.version,
            "shards": self.shards,
            "models_offset": self.models_offset,
            "tensors": [[name, list(shape)] for name, shape in self.tensors],
            "strategy": self.strategy,
            "config": self.config,
            "final": self.final,
            "contributors": self.contributors,
        }
        if self.snapshot is not None:
            meta["snapshot"] = list(self.snapshot)
            meta["deltas"] = [list(d) for d in self.deltas]
        if self.initial is not None:
            meta["initial"] = {"scheme": INITIAL_SCHEME, "sha256": list(self.initial)}
        return wire.encode_control(wire.MANIFEST, version_stream(self.version), meta)

    @classmethod
    def parse(cls, body: bytes) -> Announcement:
        """An announcement from the versions stream; StreamError("bad_announcement") if it is not one."""
        try:
            msg = wire.decode(body)
        except WireError as exc:
            raise StreamError(f"unreadable version announcement: {exc}", reason="bad_announcement") from None
        meta = msg.meta
        version, shards, models_offset, tensors = (
            meta.get(k) for k in ("version", "shards", "models_offset", "tensors")
        )
        if not (
            msg.kind == wire.MANIFEST
            and isinstance(version, int)
            and _is_int(version)
            and isinstance(shards, int)
            and _is_int(shards)
            and shards >= 1
            and isinstance(models_offset, int)
            and _is_int(models_offset)
            and models_offset >= 0
            and isinstance(tensors, list)
            and all(_is_tensor_row(row) for row in tensors)
        ):
            raise StreamError(f"malformed version announcement {meta!r:.200}", reason="bad_announcement")
        snapshot, deltas = meta.get("snapshot"), meta.get("deltas", [])
        if not (
            (snapshot is None or _is_offset_pair(snapshot))
            and isinstance(deltas, list)
            and all(_is_offset_pair(d) for d in deltas)
        ):
            raise StreamError(f"malformed snapshot or deltas in {meta!r:.200}", reason="bad_announcement")
        strategy, config = meta.get("strategy"), meta.get("config")
        return cls(
            version,
            shards,
            models_offset,
            [(str(name), tuple(shape)) for name, shape in tensors],
            dict(strategy) if isinstance(strategy, dict) else {},
            dict(config) if isinstance(config, dict) else {},
            meta.get("final") is True,
            _contributor_rows(meta.get("contributors")),
            (snapshot[0], snapshot[1]) if snapshot is not None else None,
            [(d[0], d[1]) for d in deltas],
            _initial(meta.get("initial"), shards),
        )


def _initial(raw: Any, shards: int) -> list[str] | None:
    """The announced digests of version 0: None where absent or in another scheme (the client then
    downloads); a malformed one in this scheme is refused like any malformed announcement."""
    if not isinstance(raw, dict) or raw.get("scheme") != INITIAL_SCHEME:
        return None
    digests = raw.get("sha256")
    if not (
        isinstance(digests, list)
        and len(digests) == shards
        and all(isinstance(d, str) and len(d) == 64 for d in digests)
    ):
        raise StreamError(f"malformed initial digests {raw!r:.200}", reason="bad_announcement")
    return [str(d) for d in digests]


def contributors(plan: Plan) -> list[dict[str, Any]]:
    """Who made a version: each folded update's validated broker user, update id, weight (its factor in the
    step) and staleness, as recorded with the version and announced with it."""
    return [
        {
            "client": e.client,
            "update_id": e.update_id,
            "weight": e.factor,
            "staleness": e.staleness,
            "clipped": e.clipped,
        }
        for e in plan.updates
    ]


def _contributor_rows(raw: Any) -> list[dict[str, Any]]:
    """Announced contributors, rows of the wrong shape left out (the announcement is the leader's, but a
    reader must not fail on what it only displays)."""
    if not isinstance(raw, list):
        return []
    return [
        row
        for row in raw
        if isinstance(row, dict)
        and isinstance(row.get("client"), str)
        and isinstance(row.get("update_id"), str)
    ][:MAX_ANNOUNCED_CONTRIBUTORS]


def _is_offset_pair(pair: Any) -> bool:
    """[version, models-stream offset], both non-negative integers."""
    return isinstance(pair, list) and len(pair) == 2 and all(_is_int(v) and v >= 0 for v in pair)


def _is_tensor_row(row: Any) -> bool:
    return (
        isinstance(row, list | tuple)
        and len(row) == 2
        and isinstance(row[0], str)
        and isinstance(row[1], list | tuple)
        and all(_is_int(d) and d >= 0 for d in row[1])
    )


# control messages between aggregator shards -----------------------------------------------------------------
@dataclass
class PlanEntry:
    update_id: str
    factor: float  # f_i = w_i · c_i
    client: str
    staleness: int
    clipped: bool = False


@dataclass
class Plan:
    """What every shard does to step from ``version - 1`` to ``version`` (decided by the leader's Planner)."""

    version: int
    scale: float
    updates: list[PlanEntry]
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (update id, reason)
    rule: dict[str, Any] | None = None  # a window rule's config (``robust.Rule.config``): reduce the rows
    dp: dict[str, Any] | None = None  # seed, std (noise of the step), epsilon, clip, next_clip, rate

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(data: dict[str, Any]) -> Plan:
        return Plan(
            version=int(data["version"]),
            scale=float(data["scale"]),
            updates=[PlanEntry(**e) for e in data["updates"]],
            dropped=[(str(u), str(r)) for u, r in data["dropped"]],
            rule=data.get("rule"),
            dp=data.get("dp"),
        )


def plan_id(plan: Plan) -> str:
    """A plan's identity: a version re-planned after a refused fold has the same number but another plan, and
    a shard's answer about one must never count for the other."""
    text = json.dumps(plan.to_json(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Folded:
    """A shard folded plan ``plan_id`` of ``version`` (to the leader): it holds the result, uncommitted, when
    ``refused`` is empty; else the fold failed (``reason``), the shard restored its model, and ``refused``
    names the updates that caused it. Nothing becomes a version until every shard's fold holds."""

    shard: int
    version: int
    plan_id: str
    refused: tuple[str, ...] = ()
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"type": "folded", **asdict(self), "refused": list(self.refused)}

    @staticmethod
    def from_json(data: dict[str, Any]) -> Folded:
        refused = data.get("refused", [])
        if not isinstance(refused, list) or not all(isinstance(u, str) for u in refused):
            raise ValueError("refused must be a list of strings")
        shard, version = int(data["shard"]), int(data["version"])
        return Folded(shard, version, str(data["plan_id"]), tuple(refused), str(data["reason"]))


@dataclass(frozen=True)
class Commit:
    """Every shard's fold of ``plan`` held: make it the version (to the followers). It carries the plan, so a
    follower that restarted since it folded folds it again."""

    plan: Plan

    def to_json(self) -> dict[str, Any]:
        return {"type": "commit", "plan": self.plan.to_json()}


@dataclass(frozen=True)
class Abort:
    """A shard's fold of plan ``plan_id`` failed: restore the model, the plan never becomes a version (to the
    followers; the refused updates are dropped by the next plan)."""

    version: int
    plan_id: str

    def to_json(self) -> dict[str, Any]:
        return {"type": "abort", **asdict(self)}

    @staticmethod
    def from_json(data: dict[str, Any]) -> Abort:
        return Abort(int(data["version"]), str(data["plan_id"]))


@dataclass(frozen=True)
class Committed:
    """A shard holds its complete, valid slice of an update (to the leader)."""

    shard: int
    update_id: str
    client: str
    base_version: int
    num_samples: int
    norm_sq: float
    tensors: int = 1  # tensors of the update on this shard: an update with none on any shard is empty

    def to_json(self) -> dict[str, Any]:
        return {"type": "committed", **asdict(self)}

    @staticmethod
    def from_json(data: dict[str, Any]) -> Committed:
        return Committed(
            int(data["shard"]),
            str(data["update_id"]),
            str(data["client"]),
            int(data["base_version"]),
            int(data["num_samples"]),
            float(data["norm_sq"]),
            int(data.get("tensors", 1)),
        )


@dataclass(frozen=True)
class Stepped:
    """A shard has stepped to ``version`` and published it from models-stream offset ``models_offset`` on (to
    the leader); with versions as deltas, its delta and its snapshot from these offsets (-1: none)."""

    shard: int
    version: int
    models_offset: int
    delta_offset: int = -1
    snapshot_offset: int = -1
    initial_digest: str = ""  # the shard's digest of version 0 ("": not known, e.g. an older checkpoint)

    def to_json(self) -> dict[str, Any]:
        return {"type": "stepped", **asdict(self)}

    @staticmethod
    def from_json(data: dict[str, Any]) -> Stepped:
        return Stepped(
            int(data["shard"]),
            int(data["version"]),
            int(data["models_offset"]),
            int(data.get("delta_offset", -1)),
            int(data.get("snapshot_offset", -1)),
            str(data.get("initial_digest", "")),
        )


@dataclass(frozen=True)
class Measure:
    """The leader asks every shard for the Gram matrix of these updates' deltas (for the plan of ``version``;
    robust rules Krum and centered clipping, see ``fedq.aggregation.robust``)."""

    version: int
    update_ids: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"type": "measure", "version": self.version, "update_ids": list(self.update_ids)}

    @staticmethod
    def from_json(data: dict[str, Any]) -> Measure:
        ids = data["update_ids"]
        if not isinstance(ids, list) or not all(isinstance(u, str) for u in ids):
            raise ValueError("update_ids must be a list of strings")
        return Measure(int(data["version"]), tuple(ids))


@dataclass(frozen=True)
class GramPart:
    """A shard's Gram matrix of a ``Measure``'s updates over its tensors (to the leader): K² floats."""

    shard: int
    version: int
    update_ids: tuple[str, ...]
    matrix: tuple[tuple[float, ...], ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "gram",
            "shard": self.shard,
            "version": self.version,
            "update_ids": list(self.update_ids),
            "matrix": [list(row) for row in self.matrix],
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> GramPart:
        measure = Measure.from_json(data)
        k = len(measure.update_ids)
        rows = data["matrix"]
        if not (
            isinstance(rows, list)
            and len(rows) == k
            and all(isinstance(r, list) and len(r) == k for r in rows)
        ):
            raise ValueError(f"matrix must be {k} x {k}")
        matrix = tuple(tuple(float(v) for v in row) for row in rows)
        if not all(math.isfinite(v) for row in matrix for v in row):
            raise ValueError("matrix has a value that is not finite")
        return GramPart(int(data["shard"]), measure.version, measure.update_ids, matrix)


Control = Committed | Folded | Stepped | Plan | Commit | Abort | Measure | GramPart


def encode_control(message: Control) -> bytes:
    """A control message's body on the control exchange."""
    if isinstance(message, Plan):
        return json.dumps({"type": "plan", "plan": message.to_json()}).encode()
    return json.dumps(message.to_json()).encode()


def parse_control(body: bytes) -> Control:
    """A control message from its body; StreamError("bad_control") for anything else."""
    try:
        data = json.loads(body)
        kind = data["type"]
    except (ValueError, KeyError, TypeError):
        raise StreamError("control message is not a fedq control document", reason="bad_control") from None
    try:
        if kind == "plan":
            return Plan.from_json(data["plan"])
        if kind == "committed":
            return Committed.from_json(data)
        if kind == "stepped":
            return Stepped.from_json(data)
        if kind == "folded":
            return Folded.from_json(data)
        if kind == "commit":
            return Commit(Plan.from_json(data["plan"]))
        if kind == "abort":
            return Abort.from_json(data)
        if kind == "measure":
            return Measure.from_json(data)
        if kind == "gram":
            return GramPart.from_json(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise StreamError(f"control message {kind!r:.40} is malformed: {exc}", reason="bad_control") from None
    raise StreamError(f"unknown control message {kind!r:.40}", reason="bad_control")

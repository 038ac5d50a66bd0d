"""The leader's decision of each version's membership: which updates, with which fold factors.

Every shard stages its slice of every update and reports "committed" (with the squared norm of its slice) once
its slice is complete. Only shard 0, the leader, decides: an update becomes a candidate when *every* shard has
reported it, so no shard is ever asked to fold an update it does not have. The plan for version v+1 lists the
chosen updates with their fold factors f_i = w_i · c_i and the step's scale (see ``strategies``), plus the
updates dropped for good (stale, over the norm bound, incomplete past the timeout, reported by different
users). All shards apply the same plan, so they stay identical to one aggregator holding the whole model.

The planner is pure (time is passed in) and its state is plain JSON, so the leader can journal it and restore
it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from fedq.aggregation.strategies import Candidate, NormBound, Strategy


@dataclass
class PlanEntry:
    update_id: str
    factor: float  # f_i = w_i · c_i
    client: str
    staleness: int
    clipped: bool = False


@dataclass
class Plan:
    """What every shard does to step from ``version - 1`` to ``version``."""

    version: int
    scale: float
    updates: list[PlanEntry]
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (update id, reason)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(data: dict[str, Any]) -> Plan:
        return Plan(
            version=int(data["version"]),
            scale=float(data["scale"]),
            updates=[PlanEntry(**e) for e in data["updates"]],
            dropped=[(str(u), str(r)) for u, r in data["dropped"]],
        )


@dataclass
class _Report:
    client: str
    base_version: int
    num_samples: int
    shards: set[int]
    norm_sq: float
    first_seen: float
    complete_at: float | None = None
    conflict: bool = False  # shards disagree on who sent it or what it is


class Planner:
    """Collects per-shard commit reports and turns them into plans."""

    def __init__(
        self,
        strategy: Strategy,
        *,
        shards: int,
        max_staleness: int,
        norm_bound: NormBound,
        update_timeout: float,
        version: int = 0,
        now: float = 0.0,
    ) -> None:
        self.strategy = strategy
        self.shards = shards
        self.max_staleness = max_staleness
        self.norm_bound = norm_bound
        self.update_timeout = update_timeout
        self.version = version
        self.version_started = now
        self.reports: dict[str, _Report] = {}
        self.order: list[str] = []  # update ids in the order they became complete

    def committed(
        self,
        shard: int,
        update_id: str,
        *,
        client: str,
        base_version: int,
        num_samples: int,
        norm_sq: float,
        now: float,
    ) -> None:
        """Record that ``shard`` holds its complete slice of ``update_id``; repeated reports change
        nothing."""
        report = self.reports.get(update_id)
        if report is None:
            report = _Report(client, base_version, num_samples, set(), 0.0, now)
            self.reports[update_id] = report
        elif (report.client, report.base_version, report.num_samples) != (client, base_version, num_samples):
            report.conflict = True
        if shard in report.shards:
            return
        report.shards.add(shard)
        report.norm_sq += norm_sq
        if len(report.shards) == self.shards and report.complete_at is None:
            report.complete_at = now
            self.order.append(update_id)

    def plan(self, now: float) -> Plan | None:
        """The next version's plan if the strategy is ready, else None (nothing changes then)."""
        dropped: list[tuple[str, str]] = []
        pending: list[Candidate] = []
        for update_id in list(self.order):
            report = self.reports[update_id]
            reason = self._refusal(report)
            if reason:
                dropped.append((update_id, reason))
                continue
            pending.append(
                Candidate(
                    update_id,
                    report.client,
                    report.base_version,
                    report.num_samples,
                    math.sqrt(report.norm_sq),
                    report.complete_at or now,
                )
            )
        for update_id, report in self.reports.items():
            if report.complete_at is None and now - report.first_seen > self.update_timeout:
                dropped.append((update_id, "incomplete"))
        chosen = self.strategy.select(pending, now - self.version_started)
        if not chosen:
            return None
        entries, weights = [], []
        for c in chosen:
            staleness = self.version - c.base_version
            weight = self.strategy.weight(c, staleness)
            clip = self.norm_bound.factor(c.norm)
            assert clip is not None  # refused above
            weights.append(weight)
            entries.append(PlanEntry(c.update_id, weight * clip, c.client, staleness, clip < 1.0))
        plan = Plan(self.version + 1, self.strategy.scale(weights), entries, dropped)
        self.apply(plan, now)
        return plan

    def _refusal(self, report: _Report) -> str | None:
        staleness = self.version - report.base_version
        if report.conflict:
            return "unauthorised"
        if staleness < 0 or staleness > self.max_staleness:
            return "stale"
        if self.strategy.name == "fedavg" and report.num_samples <= 0:
            return "no_samples"
        if self.norm_bound.factor(math.sqrt(report.norm_sq)) is None:
            return "norm_bound"
        return None

    def apply(self, plan: Plan, now: float) -> None:
        """Forget what ``plan`` consumed and move to its version (also used to replay a journaled plan)."""
        for update_id in [e.update_id for e in plan.updates] + [u for u, _ in plan.dropped]:
            self.reports.pop(update_id, None)
            if update_id in self.order:
                self.order.remove(update_id)
        self.version = plan.version
        self.version_started = now

    def state(self) -> dict[str, Any]:
        """Pending reports as JSON (times are not kept: a restored report starts its timeout again)."""
        return {
            update_id: {
                "client": r.client,
                "base_version": r.base_version,
                "num_samples": r.num_samples,
                "shards": sorted(r.shards),
                "norm_sq": r.norm_sq,
                "conflict": r.conflict,
                "complete": r.complete_at is not None,
            }
            for update_id, r in ((u, self.reports[u]) for u in self._state_order())
        }

    def _state_order(self) -> list[str]:
        return self.order + [u for u in self.reports if u not in self.order]

    def restore(self, state: dict[str, Any], now: float) -> None:
        for update_id, r in state.items():
            report = _Report(
                r["client"],
                r["base_version"],
                r["num_samples"],
                set(r["shards"]),
                r["norm_sq"],
                now,
                now if r["complete"] else None,
                r["conflict"],
            )
            self.reports[update_id] = report
            if report.complete_at is not None:
                self.order.append(update_id)

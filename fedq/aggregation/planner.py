"""The leader's decision of each version's membership: which updates, with which fold factors.

Every shard stages its slice of every update and reports "committed" (with the squared norm of its slice) once
its slice is complete. Only shard 0, the leader, decides: an update becomes a candidate when *every* shard has
reported it, so no shard is ever asked to fold an update it does not have. The plan for version v+1 lists the
chosen updates with their fold factors f_i = w_i · c_i and the step's scale (see ``strategies``), plus the
updates dropped for good (stale, over the norm bound, incomplete past the timeout, reported by different
users). All shards apply the same plan, so they stay identical to one aggregator holding the whole model.

Beyond the strategy's weighted mean (``robust``, ``privacy``): with a robust rule, the entries' factors are
row factors kᵢ (the mean of the rows kᵢΔᵢ is the strategy's step; the client's ``num_samples`` does not count)
and the plan names the rule; a window rule (median, trimmed mean) is then applied by every shard per window,
while a Gram rule (Krum, centered clipping) first needs every shard's Gram matrix of the chosen updates: the
planner answers ``Measure`` for them, and plans once ``gram`` has received every shard's part, with factors
aᵢkᵢ and a plain fold. With differential privacy the clip is the privacy clip, the plan carries the version's
noise (seed and std) and ε, and no plan is made once the ε budget would be exceeded (``exhausted``).

The planner is pure (time is passed in) and its state is plain JSON, so the leader can journal it and restore
it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedq.aggregation.privacy import Privacy
from fedq.aggregation.robust import GramRule, Rule, row_gram
from fedq.aggregation.strategies import Candidate, NormBound, Strategy, limit_shares
from fedq.errors import ConfigError
from fedq.protocol import Measure, Plan, PlanEntry

__all__ = ["Measure", "Plan", "PlanEntry", "Planner"]


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
    tensors: int = 0  # over the shards that reported it


class Planner:
    """Collects per-shard commit reports and turns them into plans."""

    def __init__(
        self,
        strategy: Strategy,
        *,
        shards: int,
        max_staleness: int | None,
        norm_bound: NormBound,
        update_timeout: float,
        version: int = 0,
        now: float = 0.0,
        rule: Rule | None = None,
        privacy: Privacy | None = None,
        max_share: float = 1.0,
    ) -> None:
        if rule is not None and privacy is not None:
            raise ConfigError("central DP works with the strategy's mean only: its noise is calibrated to it")
        self.strategy = strategy
        self.max_share = max_share  # FedAvg: no client's weights above this share of a version's
        self.rule = rule
        self.privacy = privacy
        self.exhausted = False  # the privacy budget allows no further version
        self.measuring: Measure | None = None
        self.grams: dict[int, np.ndarray] = {}  # shard -> its Gram part for ``measuring``
        self._request: Measure | None = None  # opened by ``plan``, not yet taken by ``measure_request``
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
        tensors: int = 1,
    ) -> None:
        """Record that ``shard`` holds its complete slice of ``update_id`` (``tensors`` of its tensors);
        repeated reports change nothing."""
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
        report.tensors += tensors
        if len(report.shards) == self.shards and report.complete_at is None:
            report.complete_at = now
            self.order.append(update_id)

    def plan(self, now: float) -> Plan | None:
        """The next version's plan if the strategy is ready, else None (nothing changes then). With a Gram
        rule the first call for a set of updates opens a ``Measure`` (see ``measure_request``) and the plan
        comes once every shard's part is in."""
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
        chosen = self._measured(pending) or self.strategy.select(pending, now - self.version_started)
        if not chosen or (self.rule is not None and not self.rule.accepts(len(chosen))):
            return None
        if isinstance(self.rule, GramRule) and self._gram_of(chosen) is None:
            request = Measure(self.version + 1, tuple(c.update_id for c in chosen))
            if request != self.measuring:
                self.measuring, self.grams, self._request = request, {}, request
            return None
        plan = self._make(chosen, dropped)
        if plan is None:
            return None
        self.apply(plan, now)
        return plan

    def measure_request(self) -> Measure | None:
        """The ``Measure`` the last ``plan`` opened, once (the leader sends it to every shard, itself
        included)."""
        request, self._request = self._request, None
        return request

    def gram(self, shard: int, version: int, update_ids: list[str], matrix: np.ndarray) -> None:
        """Record one shard's Gram part for the open ``Measure`` (parts for another request are stale)."""
        if self.measuring == Measure(version, tuple(update_ids)):
            self.grams[shard] = matrix

    def _measured(self, pending: list[Candidate]) -> list[Candidate]:
        """The updates of the open ``Measure`` while all of them are still candidates: a set being measured
        is not replaced by a larger one (FedAvg takes every pending update), or it would never finish."""
        if self.measuring is None or self.measuring.version != self.version + 1:
            return []
        by_id = {c.update_id: c for c in pending}
        if not all(u in by_id for u in self.measuring.update_ids):
            return []
        return [by_id[u] for u in self.measuring.update_ids]

    def _gram_of(self, chosen: list[Candidate]) -> np.ndarray | None:
        ids = tuple(c.update_id for c in chosen)
        if self.measuring != Measure(self.version + 1, ids) or len(self.grams) < self.shards:
            return None
        return sum((self.grams[s] for s in sorted(self.grams)), np.zeros((len(ids), len(ids))))

    def _make(self, chosen: list[Candidate], dropped: list[tuple[str, str]]) -> Plan | None:
        """The plan of ``chosen``; None when the privacy budget allows no further version."""
        robust = self.rule is not None or self.privacy is not None
        entries, weights, clips = [], [], []
        for c in chosen:
            staleness = self.version - c.base_version
            # the client's claims (num_samples) do not count where robustness or privacy is promised
            weight = (self.strategy.robust_weight if robust else self.strategy.weight)(c, staleness)
            clip = self._clip_factor(c.norm)
            assert clip is not None  # refused above
            weights.append(weight)
            clips.append(clip)
            entries.append(PlanEntry(c.update_id, weight * clip, c.client, staleness, clip < 1.0))
        if self.strategy.name == "fedavg" and not robust and self.max_share < 1.0:
            weights = limit_shares(weights, [c.client for c in chosen], self.max_share)
            for entry, weight, clip in zip(entries, weights, clips, strict=True):
                entry.factor = weight * clip
        scale = self.strategy.scale(weights)
        plan = Plan(self.version + 1, scale, entries, dropped)
        if self.rule is not None:
            # row factors kᵢ: the mean of the rows kᵢΔᵢ is the strategy's step
            rows = [scale * len(chosen) * e.factor for e in entries]
            plan.scale = 1.0
            if isinstance(self.rule, GramRule):
                raw = self._gram_of(chosen)
                assert raw is not None
                coefficients = self.rule.coefficients(row_gram(raw, rows))
                rows = [a * k for a, k in zip(coefficients, rows, strict=True)]
            else:
                plan.rule = self.rule.config()
            for entry, factor in zip(entries, rows, strict=True):
                entry.factor = factor
        if self.privacy is not None:
            epsilon = self.privacy.epsilon_after(len(chosen))
            budget = self.privacy.config.epsilon_budget
            if budget and epsilon > budget:
                self.exhausted = True
                return None
            sensitivity = scale * max(weights) * self.privacy.clip
            plan.dp = {
                # the last version when one more like it would pass the budget: every shard stops after it
                "final": bool(budget) and self.privacy.epsilon_after(len(chosen), 2) > budget,
                "seed": self.privacy.version_seed(plan.version),
                "std": self.privacy.noise_std(sensitivity, len(chosen)),
                "epsilon": epsilon,
                "clip": self.privacy.clip,
                "next_clip": self.privacy.next_clip(plan.version, [c.norm for c in chosen]),
                "rate": len(chosen) / self.privacy.config.population,
            }
        return plan

    def _clip_factor(self, norm: float) -> float | None:
        """cᵢ: the privacy clip when DP is on (always clips), else the norm bound's."""
        if self.privacy is None:
            return self.norm_bound.factor(norm)
        if not math.isfinite(norm):
            return None
        return min(1.0, self.privacy.clip / norm) if norm > 0 else 1.0

    def _refusal(self, report: _Report) -> str | None:
        staleness = self.version - report.base_version
        if report.conflict:
            return "unauthorised"
        if report.tensors == 0:  # every shard's stream empty: it would only dilute the others
            return "empty_update"
        if staleness < 0 or (self.max_staleness is not None and staleness > self.max_staleness):
            return "stale"
        if self.strategy.name == "fedavg" and report.num_samples <= 0:
            return "no_samples"
        if self._clip_factor(math.sqrt(report.norm_sq)) is None:
            return "norm_bound"
        return None

    def forget(self, update_ids: set[str]) -> None:
        """Drop the reports of updates refused outside a plan (the leader's fold refused them)."""
        for update_id in update_ids & set(self.reports):
            del self.reports[update_id]
            if update_id in self.order:
                self.order.remove(update_id)

    def apply(self, plan: Plan, now: float) -> None:
        """Forget what ``plan`` consumed and move to its version (also used to replay a journaled plan)."""
        for update_id in [e.update_id for e in plan.updates] + [u for u, _ in plan.dropped]:
            self.reports.pop(update_id, None)
            if update_id in self.order:
                self.order.remove(update_id)
        self.version = plan.version
        self.version_started = now
        self.measuring, self.grams = None, {}
        if self.privacy is not None and plan.dp is not None:
            self.privacy.account(plan.dp)

    def state(self) -> dict[str, Any]:
        """Pending reports and the privacy state as JSON (times are not kept: a restored report starts its
        timeout again)."""
        return {
            "reports": self._report_state(),
            "privacy": self.privacy.state() if self.privacy is not None else None,
        }

    def _report_state(self) -> dict[str, Any]:
        return {
            update_id: {
                "client": r.client,
                "base_version": r.base_version,
                "num_samples": r.num_samples,
                "shards": sorted(r.shards),
                "norm_sq": r.norm_sq,
                "conflict": r.conflict,
                "tensors": r.tensors,
                "complete": r.complete_at is not None,
            }
            for update_id, r in ((u, self.reports[u]) for u in self._state_order())
        }

    def _state_order(self) -> list[str]:
        return self.order + [u for u in self.reports if u not in self.order]

    def restore(self, state: dict[str, Any], now: float) -> None:
        if self.privacy is not None and state.get("privacy"):
            self.privacy.load(state["privacy"])
        for update_id, r in state.get("reports", {}).items():
            report = _Report(
                r["client"],
                r["base_version"],
                r["num_samples"],
                set(r["shards"]),
                r["norm_sq"],
                now,
                now if r["complete"] else None,
                r["conflict"],
                r.get("tensors", len(r["shards"])),
            )
            self.reports[update_id] = report
            if report.complete_at is not None:
                self.order.append(update_id)

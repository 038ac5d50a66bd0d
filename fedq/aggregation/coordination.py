"""Leader and follower bookkeeping between aggregator shards; every method returns a decision, none does
I/O on the broker.

Shard 0 leads: it collects "committed" reports (a shard holds its complete slice of an update) into its
``Planner``, decides each version's plan, and announces a version once every shard reported "stepped" to it.
A plan becomes a version in two phases: every shard folds it and answers ``Folded`` (its fold holds, kept
uncommitted, or it failed and names the updates that caused it); once every shard's fold holds the leader
commits (``Commit``), at the first that does not it aborts (``Abort``) and refuses those updates on every
shard, so no shard waits forever for a fold another refused and no two shards step differently.
The leader journals what it learned before acting on it (``leader.journal``: one JSON document per line,
fsynced), so a restart replays the reports and re-applies a plan that was decided but not checkpointed. The
service carries the decisions out: it sends plans and reports on the control exchange, applies plans and
publishes announcements.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedq.aggregation.planner import Planner
from fedq.errors import StreamError
from fedq.protocol import Committed, Control, Folded, GramPart, Plan, Stepped, plan_id

JOURNAL = "leader.journal"


@dataclass(frozen=True)
class Announce:
    """Announce ``version``: every shard has published it, the earliest from offset ``models_offset`` on;
    with versions as deltas, every shard's delta from ``delta_offset`` on and snapshot from
    ``snapshot_offset`` on (-1 where not every shard published one)."""

    version: int
    models_offset: int
    delta_offset: int = -1
    snapshot_offset: int = -1
    initial: list[str] | None = None  # every shard's digest of version 0, by shard (None: one is not known)


@dataclass(frozen=True)
class Replay:
    """What a restarted leader does: re-apply ``reapply`` (decided, not checkpointed; every shard gets it
    again) or send ``resend`` again (applied, but not every shard may have reported "stepped")."""

    reapply: Plan | None = None
    resend: Plan | None = None


@dataclass(frozen=True)
class Verdict:
    """Every shard answered the pending ``plan``: commit it, or (``reason`` set: a shard's fold failed) abort
    it and refuse ``refused`` on every shard."""

    plan: Plan
    refused: tuple[str, ...] = ()
    reason: str = ""


@dataclass(frozen=True)
class Recommit:
    """Send ``Commit(plan)`` to ``shard`` again: it folded a plan the leader has committed already (one of the
    two restarted in between)."""

    shard: int
    plan: Plan


def check_route(message: Control, shard: int) -> None:
    """Plans, commits, aborts and measures go to followers, reports to the leader; the rest is refused."""
    to_leader = isinstance(message, Committed | Folded | Stepped | GramPart)
    if to_leader != (shard == 0):
        kind = type(message).__name__.lower()
        raise StreamError(f"control message {kind!r} is not for shard {shard}", reason="bad_control")


def follow(plan: Plan, version: int) -> bool:
    """A follower's answer to a plan: True to apply it, False when it is applied already (report "stepped"
    again: the leader is waiting to hear it)."""
    if plan.version <= version:
        return False
    if plan.version != version + 1:
        raise StreamError(f"plan for version {plan.version} at version {version}", reason="version_gap")
    return True


def _lowest(offsets: list[int]) -> int:
    """The lowest offset, or -1 when a shard has none (then no client can read that publication whole)."""
    return -1 if min(offsets) < 0 else min(offsets)


class Leader:
    """Shard 0's view of the federation: the planner, the shards' "stepped" reports, the journal."""

    def __init__(self, directory: Path, planner: Planner, shards: int) -> None:
        self.journal_path = directory / JOURNAL
        self.planner = planner
        self.shards = shards
        self.stepped: dict[int, dict[int, Stepped]] = {}  # version -> shard -> its report
        self.drops: list[tuple[str, str]] = []  # refused outside the planner: in the next plan's dropped
        self.pending: Plan | None = None  # the plan the shards are folding; nothing is planned meanwhile
        self.answers: dict[int, Folded] = {}  # the pending plan's answers so far, by shard

    def committed(
        self, report: Committed, finished_updates: Collection[str], *, journal: bool, now: float
    ) -> None:
        """Record a shard's report (journaled first when it came over the broker)."""
        if report.update_id in finished_updates:
            return
        if journal:
            self._journal({"committed": report.to_json()})
        self.planner.committed(
            report.shard,
            report.update_id,
            client=report.client,
            base_version=report.base_version,
            num_samples=report.num_samples,
            norm_sq=report.norm_sq,
            now=now,
            tensors=report.tensors,
        )

    def gram(self, part: GramPart) -> None:
        """A shard's Gram part for the planner's open ``Measure`` (not journaled: a restarted leader asks
        again)."""
        self.planner.gram(part.shard, part.version, list(part.update_ids), np.array(part.matrix))

    def on_stepped(self, report: Stepped, version: int, announced: int) -> Announce | Verdict | None:
        """The announcement that is due once every shard has stepped to the current version, if any. A shard
        that stepped to the pending plan's version has committed it before the leader restarted: its fold
        held (the verdict, when it was the last answer)."""
        if report.version <= announced:
            return None
        self.stepped.setdefault(report.version, {})[report.shard] = report
        if self.pending is not None and report.version == self.pending.version:
            return self._answer(Folded(report.shard, report.version, plan_id(self.pending)))
        if report.version == version and len(self.stepped[report.version]) == self.shards:
            reports = sorted(self.stepped.pop(report.version).values(), key=lambda r: r.shard)
            digests = [r.initial_digest for r in reports]
            return Announce(
                report.version,
                min(r.models_offset for r in reports),
                _lowest([r.delta_offset for r in reports]),
                _lowest([r.snapshot_offset for r in reports]),
                digests if all(digests) else None,
            )
        return None

    def prepare(self, plan: Plan) -> None:
        """Every shard folds ``plan`` now; wait for their answers."""
        self.pending = plan
        self.answers = {}

    def on_folded(self, report: Folded, version: int, last_plan: Plan | None) -> Verdict | Recommit | None:
        """A shard's answer: the verdict once it is due (all folds held, or the first that did not); a
        ``Recommit`` for an answer about a plan committed already; None otherwise (a stale answer about an
        aborted plan changes nothing)."""
        if self.pending is not None and report.plan_id == plan_id(self.pending):
            return self._answer(report)
        committed = (
            last_plan is not None and last_plan.version == report.version <= version and not report.reason
        )
        if committed and last_plan is not None and plan_id(last_plan) == report.plan_id:
            return Recommit(report.shard, last_plan)
        return None

    def _answer(self, report: Folded) -> Verdict | None:
        assert self.pending is not None
        self.answers[report.shard] = report
        if report.reason:  # the first refusal decides: what the other shards answer no longer matters
            plan, self.pending = self.pending, None
            return Verdict(plan, report.refused, report.reason)
        if len(self.answers) == self.shards:
            plan, self.pending = self.pending, None
            return Verdict(plan)
        return None

    def plan(self, now: float, *, version: int, announced: int, max_versions: int) -> Plan | None:
        """The next version's plan, journaled, once the last one is announced, no plan is being folded, and
        the strategy is ready."""
        if self.pending is not None or announced < version or (max_versions and version >= max_versions):
            return None
        plan = self.planner.plan(now)
        if plan is not None:
            plan.dropped.extend(self.drops)  # every shard forgets them with this version
            self.drops = []
            self._journal({"plan": plan.to_json()})
        return plan

    def drop(self, refused: list[tuple[str, str]]) -> None:
        """(update id, reason) refused by a shard's fold: the next plan tells every shard to drop them."""
        self.drops.extend(refused)

    def cancel(self, version: int) -> None:
        """Forget the journaled plan of ``version`` (its fold was refused): a restart must not re-apply it.
        The journal is rewritten atomically with its reports only."""
        try:
            lines = self.journal_path.read_text().splitlines()
        except FileNotFoundError:
            return
        kept = []
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                break
            if "plan" in entry and entry["plan"].get("version") == version:
                continue
            kept.append(line)
        tmp = self.journal_path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.write("".join(line + "\n" for line in kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.journal_path)

    def applied(self) -> None:
        """A plan's version is checkpointed: the journal's reports and plan are in the state now."""
        self.journal_path.unlink(missing_ok=True)

    def replay(
        self,
        *,
        version: int,
        announced: int,
        last_plan: Plan | None,
        finished_updates: Collection[str],
        now: float,
    ) -> Replay:
        """Feed the journal's reports to the planner again; the plan to re-apply or to resend."""
        try:
            lines = self.journal_path.read_text().splitlines()
        except FileNotFoundError:
            lines = []
        pending: Plan | None = None
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                break  # a torn last line: it was never acted on
            if "committed" in entry:
                self.committed(
                    Committed.from_json(entry["committed"]), finished_updates, journal=False, now=now
                )
            elif "plan" in entry:
                plan = Plan.from_json(entry["plan"])
                if plan.version > version:
                    pending = plan
        if pending is not None:
            self.planner.apply(pending, now)
            return Replay(reapply=pending)
        if announced < version and last_plan is not None:
            return Replay(resend=last_plan)
        return Replay()

    def _journal(self, entry: dict[str, Any]) -> None:
        with open(self.journal_path, "a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())

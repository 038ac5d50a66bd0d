"""The leader's bookkeeping as decisions: announcements once every shard stepped, plans journaled, the journal
replayed after a restart (reports fed again, a decided plan re-applied), a plan committed only once every
shard's fold of it held and aborted at the first that did not."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedq.aggregation.coordination import Leader, Recommit, Verdict, check_route, follow
from fedq.aggregation.planner import Planner
from fedq.aggregation.strategies import FedBuff, NormBound
from fedq.errors import StreamError
from fedq.protocol import Abort, Commit, Committed, Folded, Plan, Stepped, plan_id


def leader(tmp_path: Path, shards: int = 2) -> Leader:
    strategy = FedBuff(buffer_size=1, server_lr=1.0, staleness="constant")
    planner = Planner(strategy, shards=shards, max_staleness=5, norm_bound=NormBound(), update_timeout=60)
    return Leader(tmp_path, planner, shards)


def test_announce_when_every_shard_stepped(tmp_path: Path) -> None:
    lead = leader(tmp_path)
    assert lead.on_stepped(Stepped(0, 1, 10), version=1, announced=0) is None
    announce = lead.on_stepped(Stepped(1, 1, 9), version=1, announced=0)
    assert announce is not None and (announce.version, announce.models_offset) == (1, 9)
    assert lead.on_stepped(Stepped(1, 1, 9), version=1, announced=1) is None


def test_plans_are_journaled_and_replayed(tmp_path: Path) -> None:
    lead = leader(tmp_path)
    for shard in (0, 1):
        lead.committed(Committed(shard, "u", "alice", 0, 1, 1.0), set(), journal=True, now=0.0)
    assert lead.plan(0.0, version=1, announced=0, max_versions=0) is None  # version 1 not announced yet
    plan = lead.plan(0.0, version=0, announced=0, max_versions=0)
    assert plan is not None and [e.update_id for e in plan.updates] == ["u"]
    again = leader(tmp_path)
    replay = again.replay(version=0, announced=0, last_plan=None, finished_updates=set(), now=0.0)
    assert replay.reapply == plan
    again.applied()
    assert (
        leader(tmp_path)
        .replay(version=1, announced=0, last_plan=plan, finished_updates=set(), now=0.0)
        .resend
    )


def test_routes_and_follow() -> None:
    check_route(Stepped(1, 1, 0), 0)
    with pytest.raises(StreamError):
        check_route(Stepped(1, 1, 0), 1)
    with pytest.raises(StreamError):
        check_route(Plan(1, 1.0, []), 0)
    check_route(Folded(1, 1, "p"), 0)
    for message in (Commit(Plan(1, 1.0, [])), Abort(1, "p")):
        check_route(message, 1)
        with pytest.raises(StreamError):
            check_route(message, 0)
    assert follow(Plan(2, 1.0, []), 1) and not follow(Plan(1, 1.0, []), 1)
    with pytest.raises(StreamError):
        follow(Plan(3, 1.0, []), 1)


def test_a_plan_is_committed_when_every_fold_held(tmp_path: Path) -> None:
    lead = leader(tmp_path, shards=3)
    plan = Plan(1, 1.0, [])
    lead.prepare(plan)
    assert lead.plan(0.0, version=0, announced=0, max_versions=0) is None  # nothing planned meanwhile
    assert lead.on_folded(Folded(0, 1, plan_id(plan)), 0, None) is None
    assert lead.on_stepped(Stepped(2, 1, 5), version=0, announced=0) is None  # committed before a restart
    assert lead.on_folded(Folded(1, 1, plan_id(plan)), 0, None) == Verdict(plan)
    assert lead.pending is None
    # a shard that folded it again after the commit (it restarted) is sent the commit again
    assert lead.on_folded(Folded(1, 1, plan_id(plan)), 1, plan) == Recommit(1, plan)


def test_the_first_failed_fold_aborts_the_plan_and_stale_answers_change_nothing(tmp_path: Path) -> None:
    lead = leader(tmp_path, shards=3)
    plan, again = Plan(1, 1.0, []), Plan(1, 0.5, [])
    lead.prepare(plan)
    assert lead.on_folded(Folded(0, 1, plan_id(plan)), 0, None) is None
    verdict = lead.on_folded(Folded(2, 1, plan_id(plan), ("m",), "nonfinite_result"), 0, None)
    assert verdict == Verdict(plan, ("m",), "nonfinite_result")
    lead.prepare(again)
    assert lead.on_folded(Folded(1, 1, plan_id(plan)), 0, None) is None  # about the aborted plan
    assert lead.answers == {}

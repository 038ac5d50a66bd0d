"""The leader's bookkeeping as decisions: announcements once every shard stepped, plans journaled, the journal
replayed after a restart (reports fed again, a decided plan re-applied)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedq.aggregation.coordination import Leader, check_route, follow
from fedq.aggregation.planner import Planner
from fedq.aggregation.strategies import FedBuff, NormBound
from fedq.errors import StreamError
from fedq.protocol import Committed, Plan, Stepped


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
    assert follow(Plan(2, 1.0, []), 1) and not follow(Plan(1, 1.0, []), 1)
    with pytest.raises(StreamError):
        follow(Plan(3, 1.0, []), 1)

"""The hostile-client rules at their honest level (issue 12): share limits and distinct clients (pure), the
bounded state, per-user quotas, the absolute stream deadline, the journal repair and a follower's commit after
a restart (in-memory broker)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from fedq import protocol
from fedq.aggregation import checkpoint
from fedq.aggregation.planner import Planner
from fedq.aggregation.staging import stream_key
from fedq.aggregation.state import ShardState
from fedq.aggregation.strategies import Candidate, FedAvg, FedBuff, NormBound, limit_shares
from fedq.codecs import get_codec
from fedq.protocol import Plan, PlanEntry, UpdateMeta
from fedq.streaming import iter_container
from fedq.transport import Transport, connect
from fedq.transport.base import REASON_HEADER
from tests.aggregation_helpers import (
    Worker,
    assert_close,
    delta_for,
    memory_broker,
    model_of,
    one_step_worker,
    send_update,
    settings,
    small_model,
    state,
    wait_version,
    write_init,
)


def test_share_limit_caps_one_clients_weight() -> None:
    """Finding 7: 10^6 samples against 100 and 50: mallory's share is cut to 0.5, the rest keep a ratio."""
    w = limit_shares([1e6, 100.0, 50.0], ["mallory", "bob", "carol"], 0.5)
    assert abs(w[0] / sum(w) - 0.5) < 1e-9 and abs(w[1] / w[2] - 2.0) < 1e-9
    assert limit_shares([1e6], ["mallory"], 0.5) == [1e6]  # alone, a client's step is its own delta
    assert limit_shares([3.0, 1.0], ["a", "b"], 1.0) == [3.0, 1.0]  # off


def test_fedavg_planner_applies_the_share_limit() -> None:
    planner = Planner(
        FedAvg(min_clients=2, round_timeout=60),
        shards=1,
        max_staleness=5,
        norm_bound=NormBound(),
        update_timeout=60,
        max_share=0.5,
    )
    planner.committed(0, "m", client="mallory", base_version=0, num_samples=10**6, norm_sq=1.0, now=0.0)
    planner.committed(0, "b", client="bob", base_version=0, num_samples=100, norm_sq=1.0, now=0.0)
    plan = planner.plan(1.0)
    assert plan is not None
    steps = {e.update_id: e.factor * plan.scale for e in plan.updates}
    assert abs(steps["m"] - 0.5) < 1e-9 and abs(steps["b"] - 0.5) < 1e-9


def test_fedbuff_can_require_k_distinct_clients() -> None:
    """Finding 8: one client's updates cannot fill the buffer alone."""
    c = [Candidate(f"u{i}", client, 0, 1, 0.0, float(i)) for i, client in enumerate(["m", "m", "m", "b"])]
    assert [x.update_id for x in FedBuff(buffer_size=2, server_lr=1, staleness="constant").select(c, 0)] == [
        "u0",
        "u1",
    ]
    distinct = FedBuff(buffer_size=2, server_lr=1, staleness="constant", distinct_clients=True)
    assert [x.update_id for x in distinct.select(c, 0)] == ["u0", "u3"]
    assert distinct.select(c[:3], 0) == []


def test_an_update_without_tensors_on_any_shard_is_refused_by_the_leader() -> None:
    planner = Planner(
        FedBuff(buffer_size=1, server_lr=1, staleness="constant"),
        shards=2,
        max_staleness=5,
        norm_bound=NormBound(),
        update_timeout=60,
    )
    for shard in (0, 1):  # claims tensors elsewhere on each shard, has none anywhere
        planner.committed(
            shard, "e", client="m", base_version=0, num_samples=1, norm_sq=0.0, now=0.0, tensors=0
        )
    for shard in (0, 1):
        planner.committed(shard, "v", client="b", base_version=0, num_samples=1, norm_sq=0.0, now=0.0)
    plan = planner.plan(1.0)
    assert plan is not None and [e.update_id for e in plan.updates] == ["v"]
    assert ("e", "empty_update") in plan.dropped


def test_remembered_ids_are_bounded() -> None:
    """Finding 11: what is remembered expires by version and is capped in count."""
    st = ShardState(0, 1)
    for version in range(30):
        st.version = version
        for i in range(50):
            st.finish(st.finished, f"v{version}-{i}")
        st.forget(keep_versions=5, most=200)
    assert len(st.finished) <= 200 and min(st.finished.values()) >= 29 - 5
    assert len(json.dumps(st.to_json())) < 20_000


def _stream(update_id: str, x0: dict[str, torch.Tensor]) -> list[bytes]:
    return list(
        iter_container(
            delta_for(1, x0),
            stream=f"s/{update_id}",
            meta=UpdateMeta(update_id, 0).to_meta(),
            codec_for=lambda n, t: get_codec("fp32"),
            chunk_bytes=4096,
        )
    )


def _reasons(broker: str, names: object) -> list[str]:
    out = []
    with connect(f"memory://ops@{broker}") as t:
        t.consume(names.dead_letter_queue, prefetch=1000)  # type: ignore[attr-defined]
        while (d := t.get(0.3)) is not None:
            out.append(d.headers[REASON_HEADER])
            t.ack(d)
    return out


def test_per_user_stream_quota_and_a_trickle_meets_its_deadline(tmp_path: Path) -> None:
    """Mallory's 5th open stream is refused (quota 4) while alice's update folds; eve's stream kept alive by
    one message per 0.3 s is dropped at its absolute deadline (1.5 s) although it is never silent for the
    update timeout (3 s: ten times the trickle's pace, so a loaded machine cannot make it a silence)."""
    broker, names = memory_broker(1)
    x0 = small_model()
    init = write_init(tmp_path, x0)
    worker = one_step_worker(
        broker,
        names,
        init,
        tmp_path / "state",
        max_versions=1,
        max_streams_per_user=4,
        update_timeout=3.0,
        stream_deadline=1.5,
    )
    trickle = _stream("t", x0)
    with (
        connect(f"memory://mallory@{broker}") as mallory,
        connect(f"memory://eve@{broker}") as eve,
        connect(f"memory://alice@{broker}") as alice,
    ):
        for k in range(5):
            mallory.publish(names.updates_exchange, names.shard_key(0), _stream(f"o{k}", x0)[0])
        mallory.flush()
        started = time.monotonic()
        for body in trickle[:-1]:
            eve.publish(names.updates_exchange, names.shard_key(0), body)
            eve.flush()
            time.sleep(0.3)
            if time.monotonic() - started > 2.5:
                break
        send_update(alice, names, delta_for(2, x0), shards=1, update_id="a", base_version=0)
        wait_version(tmp_path / "state", 1)
        worker.join(30)
    reasons = _reasons(broker, names)
    assert reasons.count("quota_streams") >= 1
    assert "expired" in reasons  # the trickle's messages after its deadline
    assert_close(model_of(tmp_path / "state"), {n: x0[n] + delta_for(2, x0)[n] for n in x0})


def test_a_journaled_plan_the_leader_cannot_apply_is_repaired_not_a_crash_loop(tmp_path: Path) -> None:
    """Finding 1's restart: a journaled plan naming an update whose staging is gone used to end every start
    with "plan 1 names update ..., which shard 0 does not hold". It is cancelled and the update refused; the
    next honest update makes version 1."""
    broker, names = memory_broker(1)
    x0 = small_model()
    init = write_init(tmp_path, x0)
    worker = one_step_worker(broker, names, init, tmp_path / "state", max_versions=1)
    worker.stop.set()
    worker.join(30)
    plan = Plan(1, 1.0, [PlanEntry("5:alice/gone", 1.0, "alice", 0)])
    (tmp_path / "state" / "shard-0" / "leader.journal").write_text(
        json.dumps({"plan": plan.to_json()}) + "\n"
    )
    worker = one_step_worker(broker, names, init, tmp_path / "state", max_versions=1)
    with connect(f"memory://bob@{broker}") as bob:
        send_update(bob, names, delta_for(2, x0), shards=1, update_id="b", base_version=0)
        wait_version(tmp_path / "state", 1)
    worker.join(30)
    assert "5:alice/gone" in state(tmp_path / "state")["finished_updates"]
    assert_close(model_of(tmp_path / "state"), {n: x0[n] + delta_for(2, x0)[n] for n in x0})


def _next_report(lead: Transport, kind: type) -> protocol.Control:
    """The next report of ``kind`` on the leader's control queue (others passed over: "stepped" at start)."""
    while (delivery := lead.get(30)) is not None:
        lead.ack(delivery)
        message = protocol.parse_control(delivery.body)
        if isinstance(message, kind) and not (isinstance(message, protocol.Stepped) and message.version == 0):
            return message
    raise AssertionError(f"no {kind.__name__} report")


def test_a_follower_that_lost_its_fold_folds_the_commit_again(tmp_path: Path) -> None:
    """Shard 1 answered "folded" and restarted before the leader's commit came (its fold was in memory only):
    the commit carries the plan, so the follower folds it again and steps, instead of waiting for a plan that
    is not sent again. The test plays the leader on the control queue of shard 0."""
    broker, names = memory_broker(2)
    x0 = small_model()
    d = delta_for(1, x0)
    config = settings(
        names,
        FedBuff(buffer_size=1, server_lr=1.0, staleness="constant"),
        write_init(tmp_path, x0),
        tmp_path / "state",
        shard=1,
        shards=2,
        max_versions=1,
    )
    worker = Worker(f"memory://aggregator@{broker}", config)
    with connect(f"memory://leader@{broker}") as lead:
        lead.consume(names.control_queue(0), prefetch=8)
        with connect(f"memory://client@{broker}") as client:
            send_update(client, names, d, shards=2, update_id="u", base_version=0)
        assert isinstance(_next_report(lead, protocol.Committed), protocol.Committed)
        plan = Plan(1, 1.0, [PlanEntry(stream_key("client", "u"), 1.0, "client", 0)])
        body = protocol.encode_control(protocol.Commit(plan))  # no Plan before it: as after a restart
        lead.publish(names.control_exchange, names.shard_key(1), body, persistent=True)
        lead.flush()
        stepped = _next_report(lead, protocol.Stepped)
        assert isinstance(stepped, protocol.Stepped) and stepped.version == 1
    worker.join(30)
    loaded = checkpoint.load(tmp_path / "state" / "shard-1", torch.device("cpu"))
    assert loaded is not None and loaded[0]
    assert_close(loaded[0], {n: x0[n] + d[n] for n in loaded[0]})

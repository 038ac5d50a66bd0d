"""The messages between clients and aggregators: what a builder writes, the parser reads back; what the parser
refuses, it refuses with a reason slug (never KeyError / TypeError)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fedq import protocol, wire
from fedq.errors import RejectedUpdate, StreamError
from fedq.protocol import Announcement, Committed, Plan, PlanEntry, Stepped, UpdateMeta


def test_update_meta_round_trip_and_metric_cleaning() -> None:
    meta = UpdateMeta("u1", 3, 12, "full", {"loss": 0.5}, "alice", update_tensors=7)
    assert UpdateMeta.parse(meta.to_meta()) == meta
    dirty = {**meta.to_meta(), "metrics": {"loss": 0.5, "Bad Name": 1.0, "nan": float("nan"), "ok": True}}
    assert UpdateMeta.parse(dirty).metrics == {"loss": 0.5}


@pytest.mark.parametrize(
    "change",
    [
        {"update_id": ""},
        {"update_id": 7},
        {"base_version": -1},
        {"base_version": True},
        {"base_version": 1.5},
        {"num_samples": "9"},
        {"num_samples": -2},
        {"kind": "weights"},
        {"metrics": [1, 2]},
        {"update_tensors": -1},
        {"update_tensors": "3"},
    ],
)
def test_update_meta_refuses_bad_fields(change: dict[str, Any]) -> None:
    with pytest.raises(RejectedUpdate) as info:
        UpdateMeta.parse({**UpdateMeta("u", 0).to_meta(), **change})
    assert info.value.reason == "bad_manifest"


def test_announcement_round_trip_and_refusals() -> None:
    a = Announcement(4, 2, 123456, [("w", (3, 4)), ("b", (4,))], {"strategy": "fedavg"}, {"steps": 5})
    assert Announcement.parse(a.encode()) == a
    for body in (
        b"junk",
        wire.encode_control(wire.MANIFEST, "version/v1", {"version": "1", "shards": 1}),
        wire.encode_control(
            wire.MANIFEST, "v", {"version": 1, "shards": 0, "models_offset": 0, "tensors": []}
        ),
        wire.encode_control(
            wire.MANIFEST, "v", {"version": 1, "shards": 1, "models_offset": 0, "tensors": [["w", [-1]]]}
        ),
    ):
        with pytest.raises(StreamError) as info:
            Announcement.parse(body)
        assert info.value.reason == "bad_announcement"


def test_control_messages_round_trip() -> None:
    plan = Plan(3, 0.5, [PlanEntry("u", 2.0, "alice", 1, True)], [("v", "stale")])
    folded = protocol.Folded(1, 3, protocol.plan_id(plan), ("u",), "nonfinite_result")
    abort = protocol.Abort(3, protocol.plan_id(plan))
    for message in (Committed(1, "u", "alice", 2, 10, 4.0), Stepped(1, 3, 17), plan, folded, abort):
        assert protocol.parse_control(protocol.encode_control(message)) == message
    commit = protocol.parse_control(protocol.encode_control(protocol.Commit(plan)))
    assert isinstance(commit, protocol.Commit) and commit.plan == plan
    assert protocol.plan_id(commit.plan) == protocol.plan_id(plan) != protocol.plan_id(Plan(3, 0.5, []))


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"type": "plan"}',
        b'{"type": "plan", "plan": {"version": 1}}',
        b'{"type": "committed", "shard": 0}',
        b'{"type": "stepped", "shard": "x", "version": 1, "models_offset": 0}',
        b'{"type": "reboot"}',
        b'{"type": "folded", "shard": 1, "version": 1, "plan_id": "x", "refused": "u", "reason": ""}',
        b'{"type": "commit"}',
        b'{"type": "abort", "version": "one", "plan_id": "x"}',
    ],
)
def test_control_parser_refuses_with_a_reason(body: bytes) -> None:
    with pytest.raises(StreamError) as info:
        protocol.parse_control(body)
    assert info.value.reason == "bad_control"


def test_stream_ids() -> None:
    assert protocol.update_stream("alice", "u1", 2) == "alice/u1/s2"
    assert protocol.model_stream(7, 0) == "model/v7/s0"
    assert protocol.version_stream(7) == "version/v7"


def test_measure_and_gram_parts_round_trip_and_refuse_bad_input() -> None:
    from fedq.protocol import GramPart, Measure, encode_control, parse_control

    measure = Measure(3, ("a", "b"))
    part = GramPart(1, 3, ("a", "b"), ((1.0, 0.5), (0.5, 2.0)))
    assert parse_control(encode_control(measure)) == measure
    assert parse_control(encode_control(part)) == part
    bad = part.to_json() | {"matrix": [[1.0, 0.5]]}
    with pytest.raises(StreamError, match="malformed"):
        parse_control(json.dumps(bad).encode())
    with pytest.raises(StreamError, match="malformed"):
        parse_control(json.dumps(part.to_json() | {"matrix": [[1.0, "x"], [0.5, 2.0]]}).encode())

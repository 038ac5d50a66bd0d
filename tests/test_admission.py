"""Admission decisions tested directly, without a broker (the way the Planner is): what is staged, ignored or
refused, and why; who owns a stream; what a complete stream must satisfy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedq import wire
from fedq.aggregation import admission
from fedq.aggregation.staging import StagingArea, stream_key
from fedq.codecs import get_codec
from fedq.errors import FedqError
from fedq.protocol import UpdateMeta
from fedq.streaming import iter_container

SHAPES = {"w": (4, 8), "b": (8,)}


def messages(stream: str, update_id: str = "u", *, base: int = 0, tensors: dict | None = None) -> list[bytes]:
    tensors = tensors or {n: torch.ones(s) for n, s in SHAPES.items()}
    meta = UpdateMeta(update_id, base).to_meta()
    return list(
        iter_container(
            tensors, stream=stream, meta=meta, codec_for=lambda n, t: get_codec("fp32"), chunk_bytes=64
        )
    )


def decide(area: StagingArea, body: bytes, user: str = "alice", **known: set[str]) -> admission.Decision:
    return admission.admit(
        wire.decode(body),
        user,
        shapes=SHAPES,
        staged=area.streams,
        finished=known.get("finished", set()),
        expired=known.get("expired", set()),
        update_timeout=60.0,
    )


def test_a_valid_stream_is_staged_and_complete(tmp_path: Path) -> None:
    area = StagingArea(tmp_path)
    for body in messages("alice/u/s0"):
        assert decide(area, body).action == admission.STAGE
        area.append("alice", wire.decode(body), body)
    staged = area.streams[stream_key("alice", "alice/u/s0")]
    assert admission.is_complete(staged)
    _, info = admission.check_complete(
        staged, version=0, max_staleness=1, finished_updates=set(), pending_updates=set()
    )
    for ref in staged.chunks.values():
        ref.check = admission.Check()
    assert admission.admitted(staged, info).client == "alice"


def test_sender_must_be_validated() -> None:
    with pytest.raises(FedqError) as info:
        admission.sender(None)
    assert info.value.reason == "unauthorised"


def test_finished_streams_are_ignored_and_expired_ones_refused(tmp_path: Path) -> None:
    area = StagingArea(tmp_path)
    body = messages("alice/u/s0")[1]
    assert decide(area, body, finished={stream_key("alice", "alice/u/s0")}).action == admission.IGNORE
    d = decide(area, body, expired={stream_key("alice", "alice/u/s0")})
    assert (d.action, d.reason) == (admission.REFUSE, "expired")


def test_unknown_tensors_and_shapes_are_refused(tmp_path: Path) -> None:
    area = StagingArea(tmp_path)
    wrong = messages("alice/u/s0", tensors={"w": torch.ones(8, 4)})
    assert decide(area, wrong[1]).reason == "shape_mismatch"
    unknown = messages("alice/u/s0", tensors={"x": torch.ones(3)})
    assert decide(area, unknown[1]).reason == "unknown_tensor"
    d = decide(area, unknown[0])
    assert (d.action, d.reason, d.forget) == (admission.REFUSE, "unknown_tensor", True)


def test_ids_are_per_user_so_nobody_can_claim_or_touch_another_users_stream(tmp_path: Path) -> None:
    """Mallory writes alice's stream and update ids: they name her own streams (findings 5, 6)."""
    area = StagingArea(tmp_path)
    for body in messages("alice/u/s0"):
        area.append("alice", wire.decode(body), body)
    bad_manifest = messages("alice/u/s0", tensors={"x": torch.ones(3)})[0]
    d = decide(area, bad_manifest, user="mallory")
    assert (d.action, d.reason, d.forget) == (admission.REFUSE, "unknown_tensor", True)
    assert admission.is_complete(area.streams[stream_key("alice", "alice/u/s0")])
    assert decide(area, messages("alice/u/s0")[1], user="mallory").action == admission.STAGE
    assert stream_key("alice", "u") != stream_key("mallory", "u")
    assert stream_key("a", "b/c") != stream_key("a/b", "c")


def test_a_complete_stream_cannot_be_changed_by_its_own_sender(tmp_path: Path) -> None:
    """Finding 1: a bad manifest on the stream of a complete update is refused alone; nothing is forgotten."""
    area = StagingArea(tmp_path)
    for body in messages("alice/u/s0"):
        area.append("alice", wire.decode(body), body)
    other = messages("alice/u/s0", tensors={"x": torch.ones(3)})
    d = decide(area, other[0])
    assert (d.action, d.reason, d.forget) == (admission.REFUSE, "manifest_mismatch", False)
    assert decide(area, messages("alice/u/s0")[0]).action == admission.IGNORE
    extra = messages("alice/u/s0", tensors={n: torch.ones(s) for n, s in SHAPES.items()})[-1]
    assert decide(area, extra).action == admission.IGNORE  # the same commit again


@pytest.mark.parametrize(
    ("base", "finished", "pending", "reason"),
    [
        (0, set(), set(), "stale"),
        (5, {stream_key("alice", "u")}, set(), "duplicate_update"),
        (5, set(), {stream_key("alice", "u")}, "duplicate_update"),
        (5, {"u", stream_key("mallory", "u")}, set(), None),
    ],
)
def test_complete_streams_are_checked_as_a_whole(
    tmp_path: Path, base: int, finished: set[str], pending: set[str], reason: str | None
) -> None:
    area = StagingArea(tmp_path)
    for body in messages("alice/u/s0", base=base):
        area.append("alice", wire.decode(body), body)
    try:
        admission.check_complete(
            area.streams[stream_key("alice", "alice/u/s0")],
            version=5,
            max_staleness=2,
            finished_updates=finished,
            pending_updates=pending,
        )
    except FedqError as exc:
        assert exc.reason == reason
    else:
        assert reason is None  # another user's id "u" is not alice's


def test_intake_is_bounded_in_bytes() -> None:
    """Finding 10: a message above the intake limit is refused before decoding, and the aggregator's prefetch
    is its memory budget over the largest message the broker accepts (rabbitmq.conf: max_message_size)."""
    from fedq.cli.aggregator import max_message_bytes

    admission.check_size(5 << 20, 5 << 20)
    with pytest.raises(FedqError) as info:
        admission.check_size((5 << 20) + 1, 5 << 20)
    assert info.value.reason == "too_large"
    conf = (Path(__file__).parent.parent / "broker_config" / "rabbitmq.conf").read_text()
    assert f"max_message_size = {max_message_bytes(4 << 20)}" in conf


@pytest.mark.parametrize("budget", [16 << 20, 32 << 20, 64 << 20, 100 << 20, 1 << 30])
@pytest.mark.parametrize("chunk_bytes", [1 << 20, 4 << 20])
def test_the_chunks_held_for_the_fold_count_against_the_memory_budget(budget: int, chunk_bytes: int) -> None:
    """Deliveries in flight (prefetch x the largest message) and the small staged chunks held in memory for
    the fold (since e9e5faa) fit in ``--memory-budget`` together; the hold takes up to a quarter of it, 16 MiB
    at most, and the aggregator's staging area is given exactly that."""
    from fedq.aggregation.staging import HOLD_BYTES
    from fedq.cli import build_parser
    from fedq.cli.aggregator import max_message_bytes, settings_from

    argv = ["aggregator", "--init", "m.safetensors", "--memory-budget", str(budget)]
    s = settings_from(build_parser().parse_args([*argv, "--chunk-bytes", str(chunk_bytes)]))
    assert s.prefetch * max_message_bytes(chunk_bytes) + s.hold_bytes <= budget
    assert s.hold_bytes == min(HOLD_BYTES, budget // 4)
    assert s.prefetch == (budget - s.hold_bytes) // max_message_bytes(chunk_bytes)


def test_a_budget_below_two_deliveries_holds_nothing(tmp_path: Path) -> None:
    """Two deliveries in flight are the floor (a consumer that waits for each message idles the broker): a
    budget below them leaves no room to hold chunks, and the staging area then holds none."""
    from fedq.cli import build_parser
    from fedq.cli.aggregator import settings_from

    args = build_parser().parse_args(["aggregator", "--init", "m.safetensors", "--memory-budget", "8MiB"])
    s = settings_from(args)
    assert (s.prefetch, s.hold_bytes) == (2, 0)
    area = StagingArea(tmp_path, s.hold_bytes)
    for body in messages("s/1"):
        area.append("alice", wire.decode(body), body)
    (staged,) = area.streams.values()
    assert staged.chunks and area.held == 0 and all(ref.held is None for ref in staged.chunks.values())
    area.close()


def test_a_manifest_listing_more_tensors_than_the_shard_has_is_refused_unparsed(tmp_path: Path) -> None:
    """Its rows are not looked at (1,900 of them took 11 ms per message to refuse); its stream is refused
    whole."""
    area = StagingArea(tmp_path)
    meta = UpdateMeta("u", 0).to_meta()
    meta["tensors"] = [[f"t{i}", "float32", [1], "fp32", 1, 1] for i in range(1900)]
    meta["chunks"] = 1900
    d = decide(area, wire.encode_control(wire.MANIFEST, "alice/u/s0", meta))
    assert (d.action, d.reason, d.forget) == (admission.REFUSE, "bad_manifest", True)
    assert "1900 tensors listed, this shard has 2" in d.detail


def test_staging_leaves_the_reserve_and_no_user_takes_more_than_half_the_room(tmp_path: Path) -> None:
    """A message that would take the state directory below its reserve is refused (``no_room``); one that
    would give its user more than half the room (what is left above the reserve + what is staged) is refused
    (``quota_room``) even while the disk has room: the other half stays for everyone else."""
    area = StagingArea(tmp_path)
    body = messages("alice/u/s0")[1]
    size = len(body)

    def verdict(user: str, staged_by_user: int, room: admission.Room) -> admission.Decision:
        return admission.admit(
            wire.decode(body),
            user,
            shapes=SHAPES,
            staged=area.streams,
            finished=set(),
            expired=set(),
            update_timeout=60.0,
            size=size,
            usage=(1, staged_by_user, 1),
            room=room,
        )

    full = verdict("alice", 0, admission.Room(left=size - 1, staged=0))
    assert full.reason == "no_room" and "--disk-reserve" in full.detail
    assert verdict("alice", 0, admission.Room(left=-5, staged=1000)).reason == "no_room"
    assert verdict("mallory", 500, admission.Room(left=500, staged=500)).reason == "quota_room"
    assert verdict("mallory", 500 - size, admission.Room(left=500, staged=500)).action == admission.STAGE
    assert verdict("alice", 0, admission.Room(left=500, staged=500)).action == admission.STAGE


def test_a_users_staged_messages_are_bounded_by_count(tmp_path: Path) -> None:
    """A message beyond the user's message quota is refused (``quota_messages``); the default quota is the
    byte quota at 64 KiB a message, and never below a chunk per tensor for every stream the user may stage."""
    area = StagingArea(tmp_path)
    body = messages("alice/u/s0")[1]

    def verdict(messages_staged: int) -> str:
        d = admission.admit(
            wire.decode(body),
            "alice",
            shapes=SHAPES,
            staged=area.streams,
            finished=set(),
            expired=set(),
            update_timeout=60.0,
            quota=admission.Quota(streams=16, nbytes=1 << 30, messages=100),
            size=len(body),
            usage=(1, 0, messages_staged),
        )
        return d.reason or d.action

    assert verdict(99) == admission.STAGE
    assert verdict(100) == "quota_messages"
    assert admission.message_quota(64 << 20, 16, 4) == 1024
    assert admission.message_quota(1 << 20, 16, 300) == 16 * 302


def test_the_disk_reserve_is_set_from_the_command_line() -> None:
    from fedq.cli import build_parser
    from fedq.cli.aggregator import settings_from

    def reserve(*argv: str) -> int:
        return settings_from(
            build_parser().parse_args(["aggregator", "--init", "m.safetensors", *argv])
        ).disk_reserve

    assert reserve() == 0  # 0: the next checkpoint's size + 64 MiB, sized when the model is known
    assert reserve("--disk-reserve", "10GiB") == 10 << 30
    args = build_parser().parse_args(["aggregator", "--init", "m.safetensors", "--max-user-messages", "5000"])
    assert settings_from(args).max_user_messages == 5000


def test_the_per_user_quota_is_set_from_the_command_line() -> None:
    """Where many clients share one broker user (a relay, the scale bench), the operator raises its quota."""
    from fedq.cli import build_parser
    from fedq.cli.aggregator import settings_from

    def settings(*argv: str) -> tuple[int, int]:
        args = build_parser().parse_args(["aggregator", "--init", "m.safetensors", *argv])
        s = settings_from(args)
        return s.max_streams_per_user, s.max_user_bytes

    assert settings() == (16, 0)  # 0: 4x the shard's fp32 model + 64 MiB, sized when the model is known
    assert settings("--max-streams-per-user", "800", "--max-user-bytes", "2GiB") == (800, 2 << 30)
    with pytest.raises(FedqError, match="at least 1"):
        settings("--max-streams-per-user", "0")

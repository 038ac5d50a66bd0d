"""The staging area's background fsyncs and deletions: what was synced survives a reopen, syncs finish in
order, a removed stream's file goes, and a stream staged again after its removal keeps its new file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fedq import wire
from fedq.aggregation.staging import StagingArea, stream_key
from fedq.codecs import get_codec
from fedq.protocol import UpdateMeta
from fedq.streaming import iter_container

A = stream_key("alice", "a/1/s0")  # streams are known by their sender and id


def _messages(stream: str) -> list[bytes]:
    tensors = {"w": torch.arange(64, dtype=torch.float32)}
    meta = UpdateMeta("u-" + stream, 0).to_meta()
    fp32 = get_codec("fp32")
    return list(
        iter_container(tensors, stream=stream, meta=meta, codec_for=lambda n, t: fp32, chunk_bytes=64)
    )


def _stage(area: StagingArea, stream: str) -> None:
    for body in _messages(stream):
        area.append("alice", wire.decode(body), body)


def test_what_a_background_sync_made_durable_is_there_after_a_reopen(tmp_path: Path) -> None:
    area = StagingArea(tmp_path)
    _stage(area, "a/1/s0")
    first = area.start_sync()
    _stage(area, "b/1/s0")
    second = area.start_sync()
    second.result()
    assert first.done()  # syncs complete in call order
    area.close()
    again = StagingArea(tmp_path)
    assert sorted(again.streams) == sorted([A, stream_key("alice", "b/1/s0")])
    for stream in again.streams.values():
        assert stream.commit is not None and len(stream.chunks) == 4
    again.close()


def test_a_removed_streams_file_is_deleted_in_the_background(tmp_path: Path) -> None:
    area = StagingArea(tmp_path)
    _stage(area, "a/1/s0")
    area.sync()
    path = area.streams[A].path
    area.remove(A)
    area.close()  # waits for the deletion
    assert not path.exists()
    assert not list(tmp_path.glob("*.stage"))


def test_a_stream_staged_again_after_its_removal_has_its_own_file(tmp_path: Path) -> None:
    area = StagingArea(tmp_path)
    _stage(area, "a/1/s0")
    old = area.streams[A].path
    area.remove(A)
    _stage(area, "a/1/s0")
    new = area.streams[A].path
    area.sync()
    area.close()
    assert new != old and new.exists() and not old.exists()
    again = StagingArea(tmp_path)
    assert again.streams[A].commit is not None
    again.close()


def test_a_sync_of_a_file_removed_meanwhile_is_not_an_error(tmp_path: Path) -> None:
    area = StagingArea(tmp_path)
    _stage(area, "a/1/s0")
    path = area.streams[A].path
    os.unlink(path)  # as the deletion of a removed stream would
    area.sync()
    area.close()


def test_a_crash_before_a_deletion_leaves_one_file_per_stream_after_the_reopen(tmp_path: Path) -> None:
    area = StagingArea(tmp_path)
    _stage(area, "a/1/s0")
    area.sync()
    area.close()
    copy = tmp_path / (
        "0" * 40 + ".0.0.stage"
    )  # a second file of the same stream, as a cut-short removal leaves
    copy.write_bytes(next(iter(tmp_path.glob("*.stage"))).read_bytes())
    again = StagingArea(tmp_path)
    assert list(again.streams) == [A]
    again.close()
    assert len(list(tmp_path.glob("*.stage"))) == 1


@pytest.mark.parametrize("streams", [1, 3])
def test_the_directory_is_synced_only_when_a_batch_created_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, streams: int
) -> None:
    from fedq.aggregation import staging

    synced_dirs: list[Path] = []
    real = staging._fsync_dir
    monkeypatch.setattr(staging, "_fsync_dir", lambda d: (synced_dirs.append(d), real(d)))
    area = StagingArea(tmp_path)
    bodies = [_messages(f"s{i}/1/s0") for i in range(streams)]
    for i in range(streams):
        area.append("alice", wire.decode(bodies[i][0]), bodies[i][0])
    area.sync()
    for i in range(streams):
        area.append("alice", wire.decode(bodies[i][1]), bodies[i][1])
    area.sync()
    area.close()
    assert synced_dirs == [tmp_path]


def test_chunks_are_held_as_they_arrived_within_the_budget_and_freed_with_their_stream(
    tmp_path: Path,
) -> None:
    bodies = _messages("a/1/s0")
    chunk = next(len(b) for b in bodies if wire.decode(b).kind == wire.CHUNK)
    area = StagingArea(tmp_path, hold_bytes=2 * chunk)  # room for two of the four chunks
    _stage(area, "a/1/s0")
    area.sync()
    staged = area.streams[A]
    refs = [staged.chunks[i] for i in sorted(staged.chunks)]
    assert [ref.held is not None for ref in refs] == [True, True, False, False]
    assert area.held == 2 * chunk
    # held or read again from its file, each chunk reads as what was sent
    assert [wire.decode_tensor(area.read(staged, r)).tolist() for r in refs] == [
        [float(v) for v in range(lo, lo + 16)] for lo in (0, 16, 32, 48)
    ]
    area.remove(A)
    assert area.held == 0
    _stage(area, "b/1/s0")  # the budget freed by the removal holds the next stream's chunks
    assert area.held == 2 * chunk
    area.close()
    again = StagingArea(tmp_path)  # after a restart nothing is held: chunks come from their files
    (restored,) = again.streams.values()
    assert len(restored.chunks) == 4 and all(ref.held is None for ref in restored.chunks.values())
    assert wire.decode_tensor(again.read(restored, restored.chunks[0])).tolist() == [
        float(v) for v in range(16)
    ]
    again.close()


def test_the_bytes_staged_are_counted_through_removals_and_reopens(tmp_path: Path) -> None:
    """``nbytes`` (all users' staged bytes, what admission's room is measured with) and each user's streams,
    bytes and messages are kept as streams are staged and removed, and rebuilt when the directory is
    reopened."""
    area = StagingArea(tmp_path)
    one = sum(len(body) for body in _messages("a/1/s0"))
    _stage(area, "a/1/s0")
    _stage(area, "b/1/s0")
    assert area.nbytes == 2 * one == sum(s.nbytes for s in area.streams.values())
    area.remove(A)
    assert area.nbytes == one and area.usage("alice") == (1, one, len(_messages("b/1/s0")))
    area.sync()
    area.close()
    again = StagingArea(tmp_path)
    assert again.usage("alice") == (1, one, len(_messages("b/1/s0")))
    again.close()

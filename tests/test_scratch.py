"""Where a client keeps its state on disk: ``Client(scratch_dir=...)``, room checked before a download, a full
directory named in the error, a store in memory (tmpfs) said once."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from fedq import scratch
from fedq.client import Client
from fedq.errors import ConfigError, NoSpaceError
from tests.aggregation_helpers import every_update
from tests.test_client import federation, memory_url, perturb, tiny_gpt


def _open_in(directory: Path) -> list[str]:
    """The files this process holds open in ``directory`` (unlinked ones included)."""
    fds = Path("/proc/self/fd")
    links = []
    for fd in fds.iterdir():
        try:
            links.append(os.readlink(fd))
        except OSError:
            continue
    return [link for link in links if link.startswith(str(directory) + "/")]


def test_the_client_keeps_its_state_in_its_scratch_dir(tmp_path: Path) -> None:
    url, where = memory_url(), tmp_path / "scratch"
    where.mkdir()
    model = tiny_gpt(seed=1)
    with (
        federation(url, "ns", tmp_path / "fed", every_update()),
        Client("a", amqp_url=url, namespace="ns", scratch_dir=where) as c,
    ):
        c.receive(model, timeout=30)
        perturb(model, 0.01, seed=0)
        c.send(model, num_samples=10)
        held = _open_in(where)
        assert c.receive(model, timeout=30).version == 1
    assert len(held) == 2 and all(link.endswith("(deleted)") for link in held)  # x̂ or base, residuals
    assert _open_in(where) == []  # closed with the client


def test_a_scratch_dir_that_is_not_a_writable_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a writable directory"):
        Client("a", amqp_url=memory_url(), scratch_dir=tmp_path / "missing")


def test_a_download_without_room_is_refused_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, where = memory_url(), tmp_path / "scratch"
    where.mkdir()
    model = tiny_gpt(seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    real = os.statvfs

    def nearly_full(path: Any) -> Any:
        stat = real(path)
        return os.statvfs_result((*stat[:4], 3, *stat[5:])) if str(path) == str(where) else stat  # 3 blocks

    monkeypatch.setattr(scratch.os, "statvfs", nearly_full)
    with (
        federation(url, "ns", tmp_path / "fed", every_update()),
        Client("a", amqp_url=url, namespace="ns", scratch_dir=where) as c,
        pytest.raises(NoSpaceError) as info,
    ):
        c.receive(model, timeout=30)
    message = str(info.value)
    assert str(where) in message and "scratch_dir" in message and "needs" in message
    assert info.value.exit_code == 4 and info.value.reason == "no_space"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_full_directory_while_writing_names_it() -> None:
    with (
        pytest.raises(NoSpaceError, match=r"no room in /somewhere: No space left on device\. Give Client"),
        scratch.writing("/somewhere"),
    ):
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(PermissionError), scratch.writing("/somewhere"):
        raise PermissionError(errno.EACCES, "denied")  # not a matter of room: as it was


def test_a_large_store_in_memory_is_said_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert scratch.filesystem_type("/dev/shm") == "tmpfs"  # Linux's shared memory: a tmpfs, as /tmp often is
    monkeypatch.setattr(scratch, "WARN_BYTES", 1000)
    monkeypatch.setattr(scratch, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="fedq.scratch"):
        scratch.check_room("/dev/shm", 999, "x̂ of version 1")
        scratch.check_room(str(tmp_path), 1 << 20, "x̂ of version 1")  # on a disk
        scratch.check_room("/dev/shm", 1 << 20, "x̂ of version 2")
        scratch.check_room("/dev/shm", 1 << 20, "x̂ of version 3")
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "/dev/shm, a tmpfs: in memory" in said[0] and "version 2" in said[0]


def test_the_filesystem_of_a_path_is_its_longest_mount_point(tmp_path: Path) -> None:
    assert scratch.filesystem_type("/proc/self") == "proc"
    assert scratch.filesystem_type(str(tmp_path)) not in (None, "proc")

"""``fedq bench codecs``: rows carry the conditions they were measured under, and ``--load`` really loads."""

from __future__ import annotations

import os
import time

import pytest
import torch

from fedq.bench import codecs as bench


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[11])  # utime


def test_busy_processes_spin_for_the_scope_and_are_gone_after() -> None:
    with bench.busy_processes(1) as procs:
        assert len(procs) == os.cpu_count()
        time.sleep(0.3)
        assert all(p.poll() is None and _cpu_ticks(p.pid) > 0 for p in procs)
    assert all(p.poll() is not None for p in procs)


def test_rows_say_their_load_threads_and_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(bench.SHAPES, "tiny", lambda: [("w", (256, 1024)), ("b", (1000,))])
    rows = bench.measure("tiny", torch.device("cpu"), ["int8", "nf4"], ["weights"], load=1)
    fedq = [r.as_json() for r in rows if r.impl == "fedq"]
    assert [r["codec"] for r in fedq] == ["int8", "nf4"]
    for r in fedq:
        assert (r["load_per_core"], r["torch_threads"], r["device"]) == (1, torch.get_num_threads(), "cpu")
        assert r["fp32_bytes"] == 4 * (256 * 1024 + 1000)
        assert 0 < r["rel_l2"] < 0.1
        assert r["encode_melem_s"] > 0 and r["decode_melem_s"] > 0


def test_the_command_line_knows_the_benchs_codecs_values_and_shapes() -> None:
    from fedq.cli import bench_codecs

    assert list(bench_codecs.CODECS) == bench.FEDQ_CODECS
    assert sorted(bench_codecs.VALUES) == sorted(bench.VALUES)
    assert sorted(bench_codecs.SHAPES) == sorted(bench.SHAPES)

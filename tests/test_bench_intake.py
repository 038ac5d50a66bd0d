"""``fedq bench intake``: the aggregator alone folds every staged update and reports its own CPU."""

from __future__ import annotations

from pathlib import Path

from fedq.bench import intake


def test_every_update_is_folded_and_the_same_updates_give_the_same_model(tmp_path: Path) -> None:
    row = intake.measure(tmp_path / "a", 20, 10, "nf4", phases=True)
    assert row["updates"] == 20
    assert row["cpu_s_per_update"] > 0 and row["wall_s_per_update"] > 0
    assert set(row["phases"]) == {"intake", "fold", "version"}
    assert all(seconds > 0 for seconds in row["phases"].values())
    # the phases are disjoint parts of the aggregator's main thread
    assert sum(row["phases"].values()) <= row["cpu_s_per_update"] * 1.05
    again = intake.measure(tmp_path / "b", 20, 10, "nf4")
    assert again["model_sha256"] == row["model_sha256"]
    assert "phases" not in again

"""``fedq bench round`` end to end on the real broker, at tiny shapes: the row the issue names, every client's
update in the version, both directions compressed."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

from fedq import cli

pytestmark = pytest.mark.broker


def test_a_tiny_round_folds_every_client_and_reports_both_directions(amqp_url: str, tmp_path: Path) -> None:
    out = tmp_path / "round.json"
    argv = ["bench", "round", "--shapes", "tiny", "--clients", "2", "--codec", "nf4", "--model-codec", "nf4"]
    assert cli.main([*argv, "--amqp-url", amqp_url, "--json", str(out)]) == 0  # refuses a partial fold
    row = json.loads(out.read_text())
    assert set(row) == {
        "clients", "codec", "round_seconds", "bytes_up", "bytes_down", "fp32_bytes_up", "fp32_bytes_down",
        "aggregator_peak_rss", "client_peak_rss", "model_fp32_bytes",
    }  # fmt: skip
    assert row["clients"] == 2 and row["fp32_bytes_up"] == 2 * row["model_fp32_bytes"]
    # nf4 both ways: about an eighth of fp32 plus block scales, in each direction
    assert 0.10 < row["bytes_up"] / row["fp32_bytes_up"] < 0.16
    assert 0.10 < row["bytes_down"] / row["fp32_bytes_down"] < 0.16


def test_a_failed_round_leaves_only_its_log(
    amqp_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A failed run keeps the aggregator's log it points to, not the model files (18 GB at Llama-3.2-1B)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    argv = ["bench", "round", "--shapes", "tiny", "--clients", "1", "--amqp-url", amqp_url]
    assert cli.main([*argv, "--timeout", "0"]) == 1  # the aggregator refuses a round timeout of 0
    (err,) = capsys.readouterr().err.splitlines()  # one line, no traceback
    assert "aggregator exited with status 2 (fedq aggregator: error: fedavg needs" in err, err
    (work,) = tmp_path.glob("fedq-bench-round-*")
    assert [p.name for p in work.iterdir()] == ["aggregator.log"]

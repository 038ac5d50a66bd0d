"""``make demo``'s quickest configuration, end to end: broker, aggregator and client processes, results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.broker
@pytest.mark.slow
def test_quick_demo_runs_end_to_end(amqp_url: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "workers.demo", "--quick", "--results-dir", str(tmp_path)],
        env={**os.environ, "FEDQ_AMQP_URL": amqp_url},
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    [result] = tmp_path.glob("demo-*.json")
    assert (tmp_path / result.name.replace(".json", ".png")).exists()
    versions = json.loads(result.read_text())["versions"]
    assert versions[0]["version"] == 0 and versions[-1]["version"] == 3
    assert versions[-1]["val_loss"] < versions[0]["val_loss"]
    assert versions[-1]["wire_bytes"] > 0
    assert versions[-1]["fp32_bytes"] > versions[-1]["wire_bytes"]
    assert versions[-1]["aggregator_peak_rss"] > 50 << 20 and versions[-1]["client_peak_rss"] > 50 << 20
    assert str(result) in done.stdout  # the launcher says where the results are

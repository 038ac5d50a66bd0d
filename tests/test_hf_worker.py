"""workers/hf_client.py as its README command runs it: federated LoRA SFT of a Llama model built from a
config, against a running aggregator on the real broker, one live line per version until the final one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedq.errors import ConfigError
from tests.aggregation_helpers import model_of
from tests.hf_models import aggregator
from workers import hf_client

pytestmark = [pytest.mark.broker, pytest.mark.slow]
SMALL = ["--width", "32", "--layers", "1", "--heads", "2", "--rank", "4", "--block-size", "32"]


def test_hf_client_trains_lora_adapters_until_the_final_version(
    amqp_url: str, namespace: str, tmp_path: Path
) -> None:
    assert hf_client.main(["--save-init", str(tmp_path / "init"), *SMALL]) == 0
    command = [
        *(sys.executable, "-m", "workers.hf_client", "--amqp-url", amqp_url),
        *("--batch-size", "4", "--eval-batches", "1", *SMALL),
    ]
    with aggregator(
        amqp_url,
        namespace,
        tmp_path / "init",
        tmp_path / "state",
        max_versions=2,
        client_config={"local_steps": 2},
    ) as state_dir:
        done = subprocess.run(
            # the namespace from the environment, as `fedq aggregator` takes it
            command,
            env={**os.environ, "FEDQ_NAMESPACE": namespace},
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        global_model = model_of(state_dir)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["version", "time", "val", "loss", "wire", "MB", "fp32", "MB", "ratio", "RSS"]
    rows = [line.split() for line in lines[1:]]
    assert [int(r[0]) for r in rows] == [0, 1, 2]
    assert rows[-1][-1] == "(final)"
    assert float(rows[-1][3]) > 0  # adapters went over the wire, nf4
    assert float(rows[-1][2]) < float(rows[0][2])  # the federated adapters lowered the held-out loss
    assert all("lora_" in name for name in global_model) and len(global_model) == 7 * 2


def test_hf_client_refusal_is_one_line_and_an_exit_code(
    amqp_url: str, namespace: str, tmp_path: Path
) -> None:
    """A client whose model does not match the aggregator's (another width) ends as `fedq` commands do."""
    assert hf_client.main(["--save-init", str(tmp_path / "init"), *SMALL]) == 0
    wider = [*SMALL[:1], "48", *SMALL[2:]]
    command = [sys.executable, "-m", "workers.hf_client", "--amqp-url", amqp_url, "--namespace", namespace]
    with aggregator(amqp_url, namespace, tmp_path / "init", tmp_path / "state"):
        done = subprocess.run([*command, *wider], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == ConfigError.exit_code, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "shape" in errors[0] and "Traceback" not in done.stderr, done.stderr

"""Versions as nf4 deltas under SIGKILL: an aggregator killed at random points and restarted never makes
clients' reconstructions diverge: a client that stayed throughout, a late joiner and the aggregator's x̂ file
are identical. (Random kills mostly land between publications, which take milliseconds here; the exact
windows inside a publication are hit on purpose in tests/test_downlink.py.)"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from fedq.client import Client
from fedq.reconstruction import file_name
from fedq.safetensors import SafetensorsReader
from fedq.topology import Names
from fedq.transport import connect
from tests.aggregation_helpers import small_model, wait_aggregator_started, write_init

pytestmark = [pytest.mark.broker, pytest.mark.slow]

VERSIONS = 6
KILLS = 3
ROUND_PAUSE = 0.6  # s; an idle machine once finished the run after 1 kill with pauses of up to 1.5 s


def _start(amqp_url: str, namespace: str, init: Path, state_dir: Path, log: Path) -> subprocess.Popen[bytes]:
    cmd = [
        *(sys.executable, "-m", "workers.aggregator", "--amqp-url", amqp_url, "--namespace", namespace),
        *("--strategy", "fedavg", "--min-clients", "1", "--max-versions", str(VERSIONS)),
        *("--init", str(init), "--state-dir", str(state_dir), "--device", "cpu"),
        *("--chunk-bytes", "65536", "--model-codec", "nf4", "--snapshot-every", "3"),
    ]
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=Path(__file__).parent.parent)


def test_sigkill_never_makes_reconstructions_diverge(tmp_path: Path, amqp_url: str, namespace: str) -> None:
    names = Names(namespace)
    x0 = small_model(scale=40)  # ~200 k parameters in 4 tensors: a snapshot is 13 chunks, a delta 4
    init = write_init(tmp_path, x0)
    state_dir, log = tmp_path / "state", tmp_path / "aggregator.log"
    with connect(amqp_url) as t:
        t.declare(names, 1)
    held: dict[str, torch.Tensor] = {}
    failures: list[BaseException] = []

    def stay() -> None:
        """Receive, train (a random step), send, until the final version."""
        g = torch.Generator().manual_seed(0)
        try:
            with Client("stays", amqp_url=amqp_url, namespace=namespace, codec="nf4") as client:
                while not client.receive(held, timeout=120).final:
                    for tensor in held.values():
                        tensor.add_(torch.randn(tensor.shape, generator=g), alpha=0.01)
                    client.send(held, num_samples=1)
                    time.sleep(ROUND_PAUSE)  # the run needs VERSIONS x ROUND_PAUSE of aggregator uptime
        except BaseException as exc:
            failures.append(exc)

    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    proc = _start(amqp_url, namespace, init, state_dir, log)
    wait_aggregator_started(log, 0)
    client = threading.Thread(target=stay, daemon=True)
    client.start()
    kills = 0
    try:
        while kills < KILLS and proc.poll() is None:
            time.sleep(rng.uniform(0.0, ROUND_PAUSE))  # so the kills land before the run can finish
            if proc.poll() is not None:
                break  # finished before all kills were spent
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            offset = log.stat().st_size
            proc = _start(amqp_url, namespace, init, state_dir, log)
            wait_aggregator_started(log, offset)
        client.join(240)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not client.is_alive() and not failures, (failures, log.read_text()[-3000:])
    assert rc == 0, log.read_text()[-3000:]
    assert kills >= 2, f"only {kills} kills landed before the run finished"
    joined: dict[str, torch.Tensor] = {}
    with Client("late", amqp_url=amqp_url, namespace=namespace) as late:
        assert late.receive(joined, timeout=60).version == VERSIONS
    with SafetensorsReader(state_dir / "shard-0" / file_name(VERSIONS)) as reconstruction:
        for name in x0:
            assert torch.equal(held[name], joined[name]), name
            assert torch.equal(held[name], reconstruction[name]), name

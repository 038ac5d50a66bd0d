"""Exactly once under SIGKILL: an aggregator killed at random points and restarted ends with the fault-free
model.

Determinism: all updates are deltas against version 0, FedBuff with a constant staleness weight and max
staleness above the run's length, so the fault-free result is x0 + (eta / K) * sum of all deltas whichever
updates end up grouped into which version (grouping changes only float rounding). Anything folded twice or
lost would move the result by a whole delta (~1e-2 relative), far above the 1e-6 bound.

With a server optimizer (FedAdam) the result depends on the grouping, which a restart may change (the order in
which staged updates are re-reported): the expected model replays Adam over the groups the aggregator logged
for each version (the last log line of a version wins: a version re-applied after a kill has the same plan).
Its state (m, v) must survive every kill exactly: lost or stale state, or a version stepped twice, moves the
model by about the learning rate per element, far above the bound.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from fedq.aggregation.server_opt import DEFAULT_LR, ServerOptConfig
from fedq.topology import Names
from fedq.transport import connect
from tests.aggregation_helpers import (
    delta_for,
    model_of,
    send_update,
    small_model,
    state,
    wait_aggregator_started,
    write_init,
)

pytestmark = [pytest.mark.broker, pytest.mark.slow]

CLIENTS = 3
VERSIONS = 6
K = 3
ETA = 0.8
KILLS = 5


def _start(
    amqp_url: str, namespace: str, init: Path, state_dir: Path, log: Path, server_opt: str
) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-m",
        "workers.aggregator",
        "--amqp-url",
        amqp_url,
        "--namespace",
        namespace,
        "--strategy",
        "fedbuff",
        "--buffer-size",
        str(K),
        "--server-lr",
        str(ETA),
        "--staleness-fn",
        "constant",
        "--max-staleness",
        "100",
        "--max-versions",
        str(VERSIONS),
        "--init",
        str(init),
        "--state-dir",
        str(state_dir),
        "--device",
        "cpu",
        "--chunk-bytes",
        "65536",
        "--memory-budget",
        str(1 << 20),
        "--server-opt",
        server_opt,
    ]
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=Path(__file__).parent.parent)


@pytest.mark.parametrize("server_opt", ["none", "adam"])
def test_sigkill_at_random_points_gives_the_fault_free_model(
    tmp_path: Path, amqp_url: str, namespace: str, server_opt: str
) -> None:
    names = Names(namespace)
    x0 = small_model(scale=40)  # ~200 k parameters in 4 tensors
    init = write_init(tmp_path, x0)
    state_dir = tmp_path / "state"
    log = tmp_path / "aggregator.log"
    with connect(amqp_url) as t:
        t.declare(names, 1)
    updates = [(f"c{c}-r{r}", delta_for(10 * c + r, x0)) for r in range(VERSIONS) for c in range(CLIENTS)]

    def publish() -> None:
        with connect(amqp_url) as client:
            for update_id, delta in updates:
                send_update(
                    client,
                    names,
                    delta,
                    shards=1,
                    update_id=update_id,
                    base_version=0,
                    codec="fp32",
                    chunk_bytes=65536,
                )
                time.sleep(random.uniform(0.3, 1.5))

    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    publisher = threading.Thread(target=publish, daemon=True)
    proc = _start(amqp_url, namespace, init, state_dir, log, server_opt)
    wait_aggregator_started(log, 0)
    publisher.start()
    deadline = time.monotonic() + 150
    kills = 0
    try:
        while kills < KILLS:
            time.sleep(rng.uniform(0.0, 2.0))
            if proc.poll() is not None:
                break  # finished before all kills were spent
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            offset = log.stat().st_size
            proc = _start(amqp_url, namespace, init, state_dir, log, server_opt)
            wait_aggregator_started(log, offset)
        publisher.join(max(1.0, deadline - time.monotonic()))
        assert not publisher.is_alive(), "publisher did not finish"
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0, log.read_text()[-3000:]
    assert kills >= 3, f"only {kills} kills landed before the run finished"
    final = state(state_dir)
    assert final["version"] == VERSIONS and final["announced"] == VERSIONS
    if server_opt == "none":
        expected = {n: x0[n].double() + ETA / K * sum(d[n].double() for _, d in updates) for n in x0}
    else:
        expected = _adam_replay(x0, dict(updates), _groups(log.read_text()))
    got = model_of(state_dir)
    for name in x0:
        rel = float((got[name].double() - expected[name]).abs().max() / expected[name].abs().max())
        assert rel <= 1e-6, f"{name}: max relative difference {rel} (kills: {kills})"
    assert torch.isfinite(got["embed"]).all()


def _groups(text: str) -> list[list[str]]:
    """The updates of each version, from the aggregator's "version v: folded n updates (id@f, ...)" lines."""
    groups: dict[int, list[str]] = {}
    for version, listed in re.findall(r"version (\d+): folded \d+ updates \(([^)]*)\)", text):
        groups[int(version)] = [_update_id(item.split("@")[0]) for item in listed.split(", ")]
    assert sorted(groups) == list(range(1, VERSIONS + 1)), sorted(groups)
    return [groups[v] for v in range(1, VERSIONS + 1)]


def _update_id(key: str) -> str:
    """The client's update id in an aggregator's update key (``stream_key(user, update_id)``)."""
    length, rest = key.split(":", 1)
    return rest[int(length) + 1 :]


def _adam_replay(
    x0: dict[str, torch.Tensor], deltas: dict[str, dict[str, torch.Tensor]], groups: list[list[str]]
) -> dict[str, torch.Tensor]:
    """x after FedAdam (the aggregator's defaults) over these groups, in float64."""
    adam = ServerOptConfig("adam")
    lr, b1, b2, tau = DEFAULT_LR["adam"], adam.beta1, adam.beta2, adam.tau
    x = {n: t.double().clone() for n, t in x0.items()}
    m = {n: torch.zeros_like(t) for n, t in x.items()}
    v = {n: torch.zeros_like(t) for n, t in x.items()}
    for group in groups:
        for n in x:
            d = ETA / K * sum(deltas[u][n].double() for u in group)
            m[n] = b1 * m[n] + (1 - b1) * d
            v[n] = b2 * v[n] + (1 - b2) * d * d
            x[n] += lr * m[n] / (v[n].sqrt() + tau)
    return x

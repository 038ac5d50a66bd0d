"""Robust rules, server optimizers and central DP through the real aggregator (in-memory transport): each
against a reference computed directly on the updates, and two shards give the same model as one."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from prometheus_client import generate_latest

from fedq import status
from fedq.aggregation.privacy import DpConfig, epsilon, window_noise
from fedq.aggregation.robust import CenteredClipping, Krum, Median, TrimmedMean
from fedq.aggregation.server_opt import ServerOptConfig, ServerOptimizer
from fedq.aggregation.strategies import FedBuff
from fedq.client import Client
from fedq.transport import connect
from tests.aggregation_helpers import (
    Worker,
    assert_close,
    delta_for,
    memory_broker,
    model_of,
    send_update,
    settings,
    small_model,
    state,
    wait_version,
    write_init,
)

K = 5
Model = dict[str, torch.Tensor]


def _updates(x0: Model, version: int) -> list[Model]:
    updates = [delta_for(10 * version + i, x0) for i in range(K)]
    updates[-1] = {n: -10 * t for n, t in updates[0].items()}  # one attacker: a sign flip x10
    return updates


def _run(tmp: Path, x0: Model, shards: int, **options: Any) -> tuple[Model, dict[str, Any]]:
    """Two versions of K updates each (all based on version 0), on ``shards`` in-memory shards."""
    broker, names = memory_broker(shards)
    init = write_init(tmp, x0)
    strategy = FedBuff(buffer_size=K, server_lr=1.0, staleness="constant")
    state_dir = tmp / f"state-{shards}"
    workers = [
        Worker(
            f"memory://aggregator@{broker}",
            settings(
                names,
                strategy,
                init,
                state_dir,
                shard=s,
                shards=shards,
                max_versions=2,
                max_staleness=5,
                chunk_bytes=2048,
                **options,
            ),
        )
        for s in range(shards)
    ]
    with connect(f"memory://client@{broker}") as client:
        for version in range(2):
            for i, delta in enumerate(_updates(x0, version)):
                send_update(client, names, delta, shards=shards, update_id=f"v{version}-{i}", base_version=0)
            wait_version(state_dir, version + 1, shards=shards)
    for worker in workers:
        worker.join(30)
    return model_of(state_dir, shards), state(state_dir)


def _flat(update: Model) -> np.ndarray:
    return np.concatenate([update[n].double().reshape(-1).numpy() for n in sorted(update)])


def _unflat(vector: np.ndarray, like: Model) -> Model:
    out, pos = {}, 0
    for n in sorted(like):
        count = like[n].numel()
        out[n] = torch.from_numpy(vector[pos : pos + count]).float().view(like[n].shape)
        pos += count
    return out


def _coordinatewise(rule: Median | TrimmedMean, updates: list[Model]) -> Model:
    return {
        n: rule.reduce(torch.stack([u[n].reshape(-1) for u in updates])).view(updates[0][n].shape)
        for n in updates[0]
    }


def _gram_step(rule: Krum | CenteredClipping, updates: list[Model]) -> Model:
    vectors = [_flat(u) for u in updates]
    gram = np.array([[a @ b for b in vectors] for a in vectors])
    coefficients = rule.coefficients(gram)
    return _unflat(sum(a * v for a, v in zip(coefficients, vectors, strict=True)), updates[0])


REFERENCES = {
    "median": lambda us: _coordinatewise(Median(), us),
    "trimmed-mean": lambda us: _coordinatewise(TrimmedMean(0.2), us),
    "krum": lambda us: _gram_step(Krum(1, 1), us),
    "multi-krum": lambda us: _gram_step(Krum(1, 0), us),
    "centered-clipping": lambda us: _gram_step(CenteredClipping(0.0, 3), us),
}


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_rule_matches_the_reference_on_one_shard_and_two(tmp_path: Path, name: str) -> None:
    x0 = small_model()
    rule = {
        "median": Median(),
        "trimmed-mean": TrimmedMean(0.2),
        "krum": Krum(1, 1),
        "multi-krum": Krum(1, 0),
        "centered-clipping": CenteredClipping(0.0, 3),
    }[name]
    # a small row budget: windows are cut into sub-windows, chunks decoded once per sub-window
    one, _ = _run(tmp_path, x0, 1, rule=rule, robust_memory=K * 4 * 100)
    two, _ = _run(tmp_path, x0, 2, rule=rule, robust_memory=K * 4 * 100)
    expected = dict(x0)
    for version in range(2):
        step = REFERENCES[name](_updates(x0, version))
        expected = {n: expected[n] + step[n] for n in x0}
    assert_close(one, expected, tol=1e-5)
    assert_close(two, one, tol=1e-6)
    # the attacker moved the model by far less than a sign flip x10 would through the mean
    assert max(float((one[n] - x0[n]).abs().max()) for n in x0) < 0.1


@pytest.mark.parametrize("name", ["avgm", "adam", "yogi", "adagrad"])
def test_server_optimizer_matches_the_reference_on_one_shard_and_two(tmp_path: Path, name: str) -> None:
    x0 = small_model()
    config = ServerOptConfig(name)
    one, _ = _run(tmp_path, x0, 1, server_opt=config)
    two, _ = _run(tmp_path, x0, 2, server_opt=config)
    reference = ServerOptimizer(config, {n: tuple(t.shape) for n, t in x0.items()})
    expected = {n: t.clone().reshape(-1) for n, t in x0.items()}
    for version in range(2):
        updates = _updates(x0, version)
        for n in x0:
            mean = sum(u[n] for u in updates).reshape(-1) / K
            expected[n] += reference.step(n, 0, mean.clone())
    assert_close(one, {n: t.view(x0[n].shape) for n, t in expected.items()}, tol=1e-5)
    assert_close(two, one, tol=1e-6)


def test_central_dp_clips_adds_the_seeded_noise_and_accounts(tmp_path: Path) -> None:
    x0 = small_model()
    dp = DpConfig(noise_multiplier=0.5, clip=1.0, population=50)
    one, final = _run(tmp_path, x0, 1, privacy=dp, dp_seed=7)
    two, _ = _run(tmp_path, x0, 2, privacy=dp, dp_seed=7)
    assert_close(two, one, tol=1e-6)  # the same noise on two shards as on one
    plan = final["last_plan"]
    assert plan["dp"]["std"] == pytest.approx(0.5 * 1.0 / K)
    assert 0 < plan["dp"]["epsilon"] < final["planner"]["privacy"]["spent"] + 1e-9
    # version 2 = version 1 + mean of the clipped updates + the version's noise, element by element
    updates = _updates(x0, 1)
    norms = [float(_flat(u) @ _flat(u)) ** 0.5 for u in updates]
    clipped = [min(1.0, 1.0 / n) for n in norms]
    first = _updates(x0, 0)
    first_clip = [min(1.0, 1.0 / float(_flat(u) @ _flat(u)) ** 0.5) for u in first]
    expected = {}
    for name in x0:
        steps = []
        for version, (us, cs) in enumerate(((first, first_clip), (updates, clipped)), start=1):
            seed = _version_seed(final, version)
            mean = sum(c * u[name] for u, c in zip(us, cs, strict=True)) / K
            noise = window_noise(seed, name, 0, x0[name].numel(), plan["dp"]["std"], torch.device("cpu"))
            steps.append(mean + noise.view(x0[name].shape))
        expected[name] = x0[name] + steps[0] + steps[1]
    assert_close(one, expected, tol=1e-5)


def _version_seed(final: dict[str, Any], version: int) -> int:
    from fedq.aggregation.privacy import derive_seed

    return derive_seed(final["planner"]["privacy"]["seed"], "version", version)


def test_dp_budget_stops_the_federation_cleanly(tmp_path: Path) -> None:
    """With a budget for a few versions, every shard stops by itself after the last version the budget allows;
    ε is recorded with it (plan, state, announcement), exported as a metric and shown by ``fedq status``."""
    x0 = small_model()
    broker, names = memory_broker(2)
    init = write_init(tmp_path, x0)
    dp = DpConfig(noise_multiplier=1.5, clip=1.0, population=50, epsilon_budget=1.2)
    strategy = FedBuff(buffer_size=K, server_lr=1.0, staleness="constant")
    state_dir = tmp_path / "state"
    workers = [
        Worker(
            f"memory://aggregator@{broker}",
            settings(names, strategy, init, state_dir, shard=s, shards=2, max_staleness=50, privacy=dp),
        )
        for s in range(2)
    ]
    with connect(f"memory://client@{broker}") as client:
        for version in range(8):
            for i, delta in enumerate(_updates(x0, version)):
                send_update(client, names, delta, shards=2, update_id=f"v{version}-{i}", base_version=0)
    for worker in workers:
        worker.join(60)  # they end on their own
    final = state(state_dir)
    made = final["version"]
    assert 1 < made < 8 and final["last_plan"]["dp"]["final"] and state(state_dir, 1)["version"] == made
    spent = final["last_plan"]["dp"]["epsilon"]
    assert spent <= 1.2 < epsilon({K / 50: made + 1}, 1.5, 1e-5)
    with Client("reader", amqp_url=f"memory://reader@{broker}", namespace=names.namespace) as reader:
        round_ = reader.receive({}, timeout=10)
    assert round_.version == made and round_.strategy["dp_epsilon"] == pytest.approx(spent)
    report = status.WorkerReport()
    status.add_samples(report, generate_latest().decode())
    out = io.StringIO()
    status.print_report(out, names.namespace, [], status.DeadLetters(0, Counter()), report, 5, 0.0)
    assert f"differential privacy: epsilon {spent:.4g} at delta 1e-05 of a budget of 1.2" in out.getvalue()

"""Central DP: clipping, reproducible noise, accounting by dp-accounting, adaptive clip, the budget."""

from __future__ import annotations

import math

import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant

from fedq.aggregation.planner import Planner
from fedq.aggregation.privacy import (
    NOISE_BLOCK,
    DpConfig,
    Privacy,
    epsilon,
    model_noise_multiplier,
    window_noise,
)
from fedq.aggregation.strategies import FedAvg, FedBuff, NormBound
from fedq.errors import ConfigError


def _planner(config: DpConfig, k: int = 4) -> Planner:
    return Planner(
        FedBuff(buffer_size=k, server_lr=1.0, staleness="constant"),
        shards=1,
        max_staleness=100,
        norm_bound=NormBound(),
        update_timeout=60,
        privacy=Privacy(config, seed=42),
    )


def _commit(planner: Planner, norms: list[float], tag: str) -> None:
    for i, norm in enumerate(norms):
        planner.committed(
            0,
            f"{tag}{i}",
            client=f"c{i}",
            base_version=planner.version,
            num_samples=1,
            norm_sq=norm**2,
            now=1.0,
        )


def test_epsilon_is_dp_accountings() -> None:
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(dp_event.PoissonSampledDpEvent(0.1, dp_event.GaussianDpEvent(1.1)), 30)
    assert epsilon({0.1: 30}, 1.1, 1e-5) == pytest.approx(accountant.get_epsilon(1e-5), rel=0.02)


def test_fixed_clip_noise_and_accounting_per_version() -> None:
    config = DpConfig(noise_multiplier=1.0, clip=2.0, population=40)
    planner = _planner(config)
    _commit(planner, [1.0, 4.0, 2.0, 8.0], "a")
    plan = planner.plan(now=2.0)
    assert plan is not None and plan.dp is not None
    assert [e.factor for e in plan.updates] == pytest.approx([1.0, 0.5, 1.0, 0.25])  # clipped to 2
    # FedBuff step = Σ Δ / K: one clipped update moves it by at most C / K; σ = z · C / K
    assert plan.dp["std"] == pytest.approx(1.0 * 2.0 / 4)
    assert plan.dp["epsilon"] == pytest.approx(epsilon({0.1: 1}, 1.0, 1e-5))
    _commit(planner, [1.0] * 4, "b")
    second = planner.plan(now=3.0)
    assert second is not None and second.dp is not None
    assert second.dp["epsilon"] == pytest.approx(epsilon({0.1: 2}, 1.0, 1e-5))
    assert second.dp["seed"] != plan.dp["seed"]


def test_noise_is_reproducible_per_window_and_seed() -> None:
    a = window_noise(7, "w", 1024, 500, 0.1, torch.device("cpu"))
    assert torch.equal(a, window_noise(7, "w", 1024, 500, 0.1, torch.device("cpu")))
    assert not torch.equal(a, window_noise(8, "w", 1024, 500, 0.1, torch.device("cpu")))
    assert a.std().item() == pytest.approx(0.1, rel=0.2)
    # whatever the windows: the same element gets the same noise
    whole = window_noise(7, "w", 0, 3 * NOISE_BLOCK, 1.0, torch.device("cpu"))
    part = window_noise(7, "w", NOISE_BLOCK - 5, NOISE_BLOCK + 9, 1.0, torch.device("cpu"))
    assert torch.equal(whole[NOISE_BLOCK - 5 : 2 * NOISE_BLOCK + 4], part)


def test_adaptive_clip_moves_towards_the_target_quantile() -> None:
    config = DpConfig(noise_multiplier=1.0, clip=10.0, population=100, target_quantile=0.5, count_std=0.6)
    planner = _planner(config, k=8)
    for v in range(30):
        _commit(planner, [float(n) for n in range(1, 9)], f"v{v}-")
        assert planner.plan(now=2.0 + v) is not None
    assert planner.privacy is not None and 3.0 < planner.privacy.clip < 6.5  # the norms' median is 4.5
    # the count's noise costs budget: the model's noise multiplier is larger than z
    assert model_noise_multiplier(1.0, 0.6) > 1.0
    with pytest.raises(ConfigError):
        model_noise_multiplier(1.0, 0.4)


def test_budget_stops_planning_and_state_survives_a_restart() -> None:
    config = DpConfig(noise_multiplier=1.5, clip=1.0, population=40, epsilon_budget=1.5)
    planner = _planner(config)
    made = 0
    for v in range(100):
        _commit(planner, [0.5] * 4, f"v{v}-")
        if planner.plan(now=2.0 + v) is None:
            break
        made += 1
    assert planner.exhausted and 0 < made < 100
    assert planner.privacy is not None and 1.2 < planner.privacy.spent <= 1.5
    restored = _planner(config)
    restored.restore(planner.state(), now=0.0)
    assert restored.privacy is not None and restored.privacy.state() == planner.privacy.state()
    assert math.isfinite(restored.privacy.spent)


def test_fedavg_with_dp_uses_unit_weights() -> None:
    planner = Planner(
        FedAvg(min_clients=2, round_timeout=60),
        shards=1,
        max_staleness=5,
        norm_bound=NormBound(),
        update_timeout=60,
        privacy=Privacy(DpConfig(noise_multiplier=1.0, clip=1.0, population=10), seed=1),
    )
    for uid, samples in (("a", 1), ("b", 1000)):
        planner.committed(0, uid, client=uid, base_version=0, num_samples=samples, norm_sq=0.25, now=1.0)
    plan = planner.plan(now=2.0)
    assert plan is not None and [e.factor for e in plan.updates] == [1.0, 1.0]
    assert plan.scale == pytest.approx(0.5) and plan.dp is not None and plan.dp["std"] == pytest.approx(0.5)


def test_dp_with_a_robust_rule_is_refused() -> None:
    from fedq.aggregation.robust import Median

    with pytest.raises(ConfigError, match="mean only"):
        Planner(
            FedAvg(min_clients=2, round_timeout=60),
            shards=1,
            max_staleness=5,
            norm_bound=NormBound(),
            update_timeout=60,
            rule=Median(),
            privacy=Privacy(DpConfig(noise_multiplier=1.0, clip=1.0, population=10), seed=1),
        )

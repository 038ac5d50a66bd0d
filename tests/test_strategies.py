"""Each strategy's step against numbers computed by hand (staleness weights, server LR, clipping included)."""

from __future__ import annotations

import math

import pytest
import torch

from fedq.aggregation.accumulator import Accumulator
from fedq.aggregation.planner import Planner
from fedq.aggregation.strategies import FedAsync, FedAvg, FedBuff, NormBound, Strategy, staleness_fn
from fedq.errors import ConfigError


def _step(
    strategy: Strategy,
    x: torch.Tensor,
    updates: list[tuple[str, int, int, torch.Tensor]],  # (id, base version, samples, delta)
    *,
    version: int,
    norm_bound: NormBound | None = None,
    max_staleness: int = 100,
) -> tuple[torch.Tensor, list[tuple[str, str]]]:
    """Plan one version with the real planner, fold with the real accumulator, apply x + scale · Σ f Δ."""
    planner = Planner(
        strategy,
        shards=1,
        max_staleness=max_staleness,
        norm_bound=norm_bound or NormBound(),
        update_timeout=60,
        version=version,
    )
    deltas = {}
    for update_id, base, samples, delta in updates:
        deltas[update_id] = delta
        planner.committed(
            0,
            update_id,
            client="c",
            base_version=base,
            num_samples=samples,
            norm_sq=float(delta.pow(2).sum()),
            now=1.0,
        )
    plan = planner.plan(now=2.0)
    assert plan is not None and plan.version == version + 1
    acc = Accumulator({"w": tuple(x.shape)})
    for entry in plan.updates:
        acc.fold("w", 0, deltas[entry.update_id], entry.factor)
        acc.add_update(entry.factor)
    return x + plan.scale * acc.get("w"), plan.dropped


def test_staleness_functions() -> None:
    assert staleness_fn("constant")(7) == 1.0
    assert staleness_fn("polynomial:0.5")(3) == pytest.approx(0.5)  # 1/sqrt(1+3)
    assert staleness_fn("polynomial:2")(1) == pytest.approx(0.25)
    hinge = staleness_fn("hinge:1:2")
    assert hinge(2) == 1.0 and hinge(4) == pytest.approx(1 / 3)
    with pytest.raises(ConfigError):
        staleness_fn("hinge:1")


def test_fedavg_full_updates_is_the_sample_weighted_average() -> None:
    x = torch.tensor([1.0, 1.0])
    # full weights [0,4] (1 sample) and [4,0] (3 samples) as deltas against x
    updates = [("a", 3, 1, torch.tensor([0.0, 4.0]) - x), ("b", 3, 3, torch.tensor([4.0, 0.0]) - x)]
    new, _ = _step(FedAvg(min_clients=2, round_timeout=60), x, updates, version=3)
    assert new.tolist() == pytest.approx([3.0, 1.0])  # (0·1 + 4·3)/4, (4·1 + 0·3)/4


def test_fedavg_waits_for_min_clients_then_times_out() -> None:
    strategy = FedAvg(min_clients=3, round_timeout=10)
    planner = Planner(strategy, shards=1, max_staleness=5, norm_bound=NormBound(), update_timeout=60, now=0.0)
    planner.committed(0, "a", client="c", base_version=0, num_samples=2, norm_sq=1.0, now=1.0)
    assert planner.plan(now=5.0) is None
    plan = planner.plan(now=10.5)
    assert (
        plan is not None and [e.update_id for e in plan.updates] == ["a"] and plan.scale == pytest.approx(0.5)
    )


def test_fedbuff_staleness_weight_and_server_lr() -> None:
    x = torch.tensor([1.0, 1.0])
    # version 3: a is fresh (s=1), b has staleness 3 (s = 1/sqrt(4) = 1/2); K = 2, eta = 0.5
    updates = [("a", 3, 1, torch.tensor([2.0, 4.0])), ("b", 0, 1, torch.tensor([4.0, -8.0]))]
    new, _ = _step(FedBuff(buffer_size=2, server_lr=0.5, staleness="polynomial:0.5"), x, updates, version=3)
    # x + 0.5 · (1·[2,4] + 0.5·[4,-8]) / 2 = [1,1] + 0.25·[4,0]
    assert new.tolist() == pytest.approx([2.0, 1.0])


def test_fedbuff_waits_for_k_and_takes_the_first_k() -> None:
    planner = Planner(
        FedBuff(buffer_size=2, server_lr=1, staleness="constant"),
        shards=1,
        max_staleness=5,
        norm_bound=NormBound(),
        update_timeout=60,
    )
    planner.committed(0, "a", client="c", base_version=0, num_samples=1, norm_sq=1.0, now=1.0)
    assert planner.plan(now=1.0) is None
    planner.committed(0, "b", client="c", base_version=0, num_samples=1, norm_sq=1.0, now=1.0)
    planner.committed(0, "c", client="c", base_version=0, num_samples=1, norm_sq=1.0, now=1.0)
    plan = planner.plan(now=2.0)
    assert plan is not None and [e.update_id for e in plan.updates] == ["a", "b"] and plan.scale == 0.5
    assert planner.plan(now=3.0) is None  # "c" waits for a second update at version 1


def test_fedasync_hinge_full_update_is_the_convex_mix() -> None:
    x = torch.tensor([1.0, 1.0])
    client = torch.tensor([7.0, 1.0])
    # version 5, base 1: tau = 4 > b = 2, s = 1/(1·(4-2)+1) = 1/3; alpha·s = 1/6
    new, _ = _step(FedAsync(alpha=0.5, staleness="hinge:1:2"), x, [("a", 1, 1, client - x)], version=5)
    assert new.tolist() == pytest.approx([(5 / 6) * 1 + (1 / 6) * 7, 1.0])


def test_fedasync_polynomial_delta() -> None:
    x = torch.tensor([0.0])
    # tau = 1, polynomial a = 1: s = 1/2; alpha = 0.8 -> x + 0.4·Δ
    new, _ = _step(
        FedAsync(alpha=0.8, staleness="polynomial:1"), x, [("a", 0, 1, torch.tensor([10.0]))], version=1
    )
    assert new.tolist() == pytest.approx([4.0])


def test_stale_update_is_dropped_with_its_reason() -> None:
    x = torch.tensor([0.0])
    updates = [("old", 2, 1, torch.tensor([100.0])), ("new", 5, 1, torch.tensor([1.0]))]
    new, dropped = _step(FedAsync(alpha=1, staleness="constant"), x, updates, version=5, max_staleness=2)
    assert dropped == [("old", "stale")]
    assert new.tolist() == [1.0]


def _honest_and_malicious() -> list[tuple[str, int, int, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    honest = [(f"h{i}", 0, 10, 0.01 * torch.randn(1000, generator=g)) for i in range(4)]
    return [*honest, ("evil", 0, 10, 1000.0 * torch.ones(1000))]


def test_norm_bound_clip_keeps_one_malicious_client_inside_the_bound() -> None:
    x = torch.zeros(1000)
    bound = 1.0
    new, _ = _step(
        FedAvg(min_clients=5, round_timeout=60),
        x,
        _honest_and_malicious(),
        version=0,
        norm_bound=NormBound(bound, clip=True),
    )
    moved = float((new - x).norm())
    assert moved <= bound * (1 + 1e-6)
    unbounded, _ = _step(FedAvg(min_clients=5, round_timeout=60), x, _honest_and_malicious(), version=0)
    assert float((unbounded - x).norm()) > 1000  # without the bound the attacker moves the model ~6000


def test_norm_bound_reject_gives_the_honest_average() -> None:
    x = torch.zeros(1000)
    updates = _honest_and_malicious()
    new, dropped = _step(
        FedAvg(min_clients=4, round_timeout=60), x, updates, version=0, norm_bound=NormBound(1.0, clip=False)
    )
    assert dropped == [("evil", "norm_bound")]
    honest = torch.stack([d for _, _, _, d in updates[:4]]).mean(0)
    torch.testing.assert_close(new, honest)


def test_sharded_update_waits_for_every_shard_and_expires_when_incomplete() -> None:
    planner = Planner(
        FedAsync(alpha=1, staleness="constant"),
        shards=2,
        max_staleness=5,
        norm_bound=NormBound(5.0, clip=True),
        update_timeout=10,
    )
    planner.committed(0, "half", client="c", base_version=0, num_samples=1, norm_sq=1.0, now=0.0)
    planner.committed(0, "full", client="c", base_version=0, num_samples=1, norm_sq=9.0, now=1.0)
    assert planner.plan(now=2.0) is None
    planner.committed(1, "full", client="c", base_version=0, num_samples=1, norm_sq=16.0, now=3.0)
    plan = planner.plan(now=11.0)  # "full" has norm sqrt(9+16) = 5: exactly the bound, not clipped
    assert plan is not None
    assert [(e.update_id, e.factor, e.clipped) for e in plan.updates] == [("full", 1.0, False)]
    assert plan.dropped == [("half", "incomplete")]


def test_updates_reported_by_different_users_are_refused() -> None:
    planner = Planner(
        FedAsync(alpha=1, staleness="constant"),
        shards=2,
        max_staleness=5,
        norm_bound=NormBound(),
        update_timeout=10,
    )
    planner.committed(0, "u", client="alice", base_version=0, num_samples=1, norm_sq=1.0, now=0.0)
    planner.committed(1, "u", client="mallory", base_version=0, num_samples=1, norm_sq=1.0, now=0.0)
    planner.committed(0, "v", client="alice", base_version=0, num_samples=1, norm_sq=1.0, now=0.0)
    planner.committed(1, "v", client="alice", base_version=0, num_samples=1, norm_sq=1.0, now=0.0)
    plan = planner.plan(now=1.0)
    assert plan is not None and plan.dropped == [("u", "unauthorised")] and plan.updates[0].update_id == "v"


def test_planner_state_round_trips() -> None:
    planner = Planner(
        FedBuff(buffer_size=3, server_lr=1, staleness="constant"),
        shards=2,
        max_staleness=5,
        norm_bound=NormBound(),
        update_timeout=10,
        version=4,
    )
    planner.committed(0, "a", client="c", base_version=4, num_samples=1, norm_sq=2.0, now=0.0)
    planner.committed(1, "a", client="c", base_version=4, num_samples=1, norm_sq=3.0, now=0.0)
    planner.committed(1, "b", client="c", base_version=4, num_samples=1, norm_sq=3.0, now=0.0)
    other = Planner(
        FedBuff(buffer_size=3, server_lr=1, staleness="constant"),
        shards=2,
        max_staleness=5,
        norm_bound=NormBound(),
        update_timeout=10,
        version=4,
    )
    other.restore(planner.state(), now=0.0)
    assert other.state() == planner.state()
    assert math.isclose(other.reports["a"].norm_sq, 5.0)

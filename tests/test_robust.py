"""Robust rules and server optimizers against straightforward reference implementations on small tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedq.aggregation.planner import Measure, Plan, Planner
from fedq.aggregation.robust import (
    CenteredClipping,
    Krum,
    Median,
    TrimmedMean,
    block_columns,
    make_rule,
    sorted_blocks,
)
from fedq.aggregation.server_opt import ServerOptConfig, ServerOptimizer
from fedq.aggregation.strategies import FedAvg, FedBuff, NormBound
from fedq.errors import ConfigError


def _ref_median(column: list[float]) -> float:
    s = sorted(column)
    k = len(s)
    return s[k // 2] if k % 2 else (s[k // 2 - 1] + s[k // 2]) / 2


def _ref_trimmed(column: list[float], trim: float) -> float:
    s = sorted(column)
    b = int(trim * len(s))
    kept = s[b : len(s) - b]
    return sum(kept) / len(kept)


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8, 13, 32])
def test_median_and_trimmed_mean_match_the_reference(k: int) -> None:
    rows = torch.randn(k, 37, generator=torch.Generator().manual_seed(k))
    columns = rows.t().tolist()
    ((lo, ranks),) = sorted_blocks(rows.clone(), range(k))
    assert lo == 0 and torch.equal(torch.stack(ranks), rows.sort(dim=0).values)
    assert Median().reduce(rows.clone()).tolist() == pytest.approx([_ref_median(c) for c in columns])
    for trim in (0.0, 0.2, 0.3):
        got = TrimmedMean(trim).reduce(rows.clone()).tolist()
        assert got == pytest.approx([_ref_trimmed(c, trim) for c in columns], abs=1e-6)


@pytest.mark.parametrize("k", [2, 7, 16, 32])
def test_sorted_blocks_give_the_wanted_ranks_of_every_column(k: int) -> None:
    """Over several column blocks (the last one partial), with the network pruned to the wanted ranks."""
    width = 2 * block_columns(k) + 5
    rows = torch.randn(k, width, generator=torch.Generator().manual_seed(k))
    reference = rows.sort(dim=0).values
    for wanted in (
        range(k),
        range(k // 2, k // 2 + 1),
        range(0, 1),
        range(k - 1, k),
        range(1, max(2, k - 1)),
    ):
        got = torch.empty(len(wanted), width)
        blocks = 0
        for lo, ranks in sorted_blocks(rows.clone(), wanted):
            got[:, lo : lo + ranks[0].numel()] = torch.stack(ranks)
            blocks += 1
        assert blocks == 3 and torch.equal(got, reference[wanted.start : wanted.stop])


def _ref_krum(vectors: list[np.ndarray], f: int, m: int) -> list[int]:
    k = len(vectors)
    scores = []
    for i in range(k):
        d = sorted(float(((vectors[i] - vectors[j]) ** 2).sum()) for j in range(k) if j != i)
        scores.append(sum(d[: k - f - 2]))
    return sorted(range(k), key=lambda i: scores[i])[:m]


def _gram(vectors: list[np.ndarray]) -> np.ndarray:
    return np.array([[float(a @ b) for b in vectors] for a in vectors])


def test_krum_and_multi_krum_select_what_the_reference_selects() -> None:
    rng = np.random.default_rng(0)
    honest = [rng.normal(0, 1, 50) for _ in range(7)]
    attackers = [-10 * honest[0], rng.normal(0, 30, 50)]
    vectors = honest + attackers
    for f, m in ((2, 1), (2, 3), (1, 4)):
        coefficients = Krum(f, m).coefficients(_gram(vectors))
        chosen = [i for i, a in enumerate(coefficients) if a]
        assert chosen == sorted(_ref_krum(vectors, f, m))
        assert all(a == pytest.approx(1 / m) for a in coefficients if a)
        assert not {7, 8} & set(chosen)
    assert not Krum(3, 1).accepts(8) and Krum(2, 1).accepts(7)
    with pytest.raises(ConfigError):
        Krum(3, 1).require(8)


def test_centered_clipping_matches_iterating_on_the_vectors() -> None:
    rng = np.random.default_rng(1)
    vectors = [rng.normal(0, 1, 20) for _ in range(6)] + [rng.normal(0, 1, 20) * 50]
    radius, iterations = 3.0, 4
    v = np.zeros(20)
    for _ in range(iterations):
        step = np.zeros(20)
        for x in vectors:
            diff = x - v
            step += diff * min(1.0, radius / np.linalg.norm(diff))
        v = v + step / len(vectors)
    a = CenteredClipping(radius, iterations).coefficients(_gram(vectors))
    assert sum(ai * x for ai, x in zip(a, vectors, strict=True)) == pytest.approx(v)


def _ref_adaptive(name: str, ds: list[float], lr: float, b1: float, b2: float, tau: float) -> float:
    x = m = v = 0.0
    for d in ds:
        if name == "avgm":
            m = b1 * m + d
            x += lr * m
            continue
        m = b1 * m + (1 - b1) * d
        if name == "adam":
            v = b2 * v + (1 - b2) * d * d
        elif name == "yogi":
            v = v - (1 - b2) * d * d * math.copysign(1.0, v - d * d) * (v != d * d)
        else:
            v = v + d * d
        x += lr * m / (math.sqrt(v) + tau)
    return x


@pytest.mark.parametrize("name", ["avgm", "adam", "yogi", "adagrad"])
def test_server_optimizers_match_the_reference(name: str) -> None:
    steps = torch.randn(6, 2, 9, generator=torch.Generator().manual_seed(3)) * 0.01
    config = ServerOptConfig(name, lr=0.05, beta1=0.8, beta2=0.95, tau=1e-3)
    opt = ServerOptimizer(config, {"w": (2, 9)})
    x = torch.zeros(18)
    for d in steps:
        flat = d.reshape(-1).clone()
        # two windows, in reverse order: the update is element-wise
        x[9:] += opt.step("w", 9, flat[9:].clone())
        x[:9] += opt.step("w", 0, flat[:9].clone())
    reference = [
        _ref_adaptive(name, steps[:, i // 9, i % 9].tolist(), 0.05, 0.8, 0.95, 1e-3) for i in range(18)
    ]
    assert x.tolist() == pytest.approx(reference, rel=1e-4, abs=1e-7)
    restored = ServerOptimizer(config, {"w": (2, 9)})
    restored.load({n: t.clone() for n, t in opt.tensors().items()})
    d = torch.full((18,), 0.003)
    assert restored.step("w", 0, d.clone()).tolist() == pytest.approx(opt.step("w", 0, d.clone()).tolist())


def _commit(planner: Planner, deltas: dict[str, torch.Tensor], samples: int = 1) -> None:
    for uid, delta in deltas.items():
        planner.committed(
            0,
            uid,
            client=uid,
            base_version=0,
            num_samples=samples,
            norm_sq=float(delta.pow(2).sum()),
            now=1.0,
        )


def _deltas(k: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(k)
    return {f"u{i}": torch.randn(12, generator=g) for i in range(k)}


def test_window_rule_plan_rows_are_the_strategys_contributions() -> None:
    """FedBuff with η = 0.5: rows are 0.5·Δᵢ (the mean of the rows is FedBuff's step); the median of them."""
    deltas = _deltas(5)
    planner = Planner(
        FedBuff(buffer_size=5, server_lr=0.5, staleness="constant"),
        shards=1,
        max_staleness=5,
        norm_bound=NormBound(),
        update_timeout=60,
        rule=Median(),
    )
    _commit(planner, deltas)
    plan = planner.plan(now=2.0)
    assert isinstance(plan, Plan) and plan.rule == {"rule": "median"} and plan.scale == 1.0
    rows = torch.stack([e.factor * deltas[e.update_id] for e in plan.updates])
    expected = 0.5 * torch.stack(list(deltas.values())).median(dim=0).values
    assert Median().reduce(rows).tolist() == pytest.approx(expected.tolist())


def test_fedavg_with_a_robust_rule_ignores_claimed_samples() -> None:
    deltas = _deltas(4)
    planner = Planner(
        FedAvg(min_clients=4, round_timeout=60),
        shards=1,
        max_staleness=5,
        norm_bound=NormBound(),
        update_timeout=60,
        rule=make_rule("trimmed-mean", trim=0.25, byzantine=0, krum_select=1, cc_radius=0, cc_iterations=1),
    )
    for i, (uid, delta) in enumerate(deltas.items()):
        planner.committed(
            0, uid, client=uid, base_version=0, num_samples=10**i, norm_sq=float(delta.pow(2).sum()), now=1.0
        )
    plan = planner.plan(now=2.0)
    assert isinstance(plan, Plan) and [e.factor for e in plan.updates] == pytest.approx([1.0] * 4)


def test_krum_plan_sums_the_shards_gram_parts_and_selects() -> None:
    """Two shards each hold half of every update; the leader sums their Gram parts, Krum selects, and the
    plan's factors fold the chosen update (the same as Krum over the whole vectors)."""
    deltas = _deltas(6)
    deltas["u5"] = deltas["u0"] * -10  # an attacker
    planner = Planner(
        FedBuff(buffer_size=6, server_lr=1.0, staleness="constant"),
        shards=2,
        max_staleness=5,
        norm_bound=NormBound(),
        update_timeout=60,
        rule=Krum(1, 2),
    )
    for shard, part in ((0, slice(0, 5)), (1, slice(5, 12))):
        for uid, delta in deltas.items():
            planner.committed(
                shard,
                uid,
                client=uid,
                base_version=0,
                num_samples=1,
                norm_sq=float(delta[part].pow(2).sum()),
                now=1.0,
            )
    assert planner.plan(now=2.0) is None
    request = planner.measure_request()
    assert request == Measure(1, tuple(deltas))
    assert planner.plan(now=2.1) is None and planner.measure_request() is None  # asked once
    vectors = [d.double().numpy() for d in deltas.values()]
    for shard, part in ((0, slice(0, 5)), (1, slice(5, 12))):
        assert planner.plan(now=2.2) is None
        planner.gram(shard, 1, list(request.update_ids), _gram([v[part] for v in vectors]))
    plan = planner.plan(now=3.0)
    assert isinstance(plan, Plan) and plan.rule is None
    chosen = sorted(_ref_krum(vectors, 1, 2))
    assert [i for i, e in enumerate(plan.updates) if e.factor] == chosen
    step = sum(e.factor * deltas[e.update_id] for e in plan.updates)
    assert step.tolist() == pytest.approx(sum(vectors[i] for i in chosen).__truediv__(2).tolist())

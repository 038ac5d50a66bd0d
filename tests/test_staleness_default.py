"""With many clients staleness is about clients / K: the asynchronous strategies weight old updates by default
instead of refusing them; FedAvg, which weights by samples alone, keeps refusing them."""

from __future__ import annotations

import pytest

from fedq.aggregation.planner import Planner
from fedq.aggregation.strategies import FedBuff, NormBound
from fedq.cli import build_parser
from fedq.cli.aggregator import settings_from


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--strategy", "fedbuff"], None),
        (["--strategy", "fedasync"], None),
        (["--strategy", "fedavg"], 10),
        (["--strategy", "fedbuff", "--max-staleness", "3"], 3),
    ],
)
def test_default_max_staleness_follows_the_strategy(argv: list[str], expected: int | None) -> None:
    args = build_parser().parse_args(["aggregator", "--init", "m.safetensors", *argv])
    assert settings_from(args).max_staleness == expected


def test_without_a_bound_an_old_update_is_folded_with_its_staleness_weight() -> None:
    planner = Planner(
        FedBuff(buffer_size=2, server_lr=1.0, staleness="polynomial:0.5"),
        shards=1,
        max_staleness=None,
        norm_bound=NormBound(),
        update_timeout=60,
        version=50,
    )
    for update_id, base in (("fresh", 50), ("old", 2)):
        planner.committed(0, update_id, client="c", base_version=base, num_samples=1, norm_sq=1.0, now=1.0)
    plan = planner.plan(now=2.0)
    assert plan is not None and not plan.dropped
    factors = {e.update_id: e.factor for e in plan.updates}
    assert factors == pytest.approx({"fresh": 1.0, "old": 49**-0.5})

"""Aggregation strategies: which committed updates make the next model version, and with what weights.

Every strategy is expressed in one form, so that the fold and the step are the same code for all of them:

    x_{v+1} = x_v + scale · Σ_i f_i · Δ_i,        f_i = w_i · c_i

where Δ_i is update i's delta (for a "full" update, Δ_i = x_client − x_v, taken against the global the update
is folded into, so a full update needs no base model), w_i its strategy weight, c_i ≤ 1 its norm-bound clip
factor (``NormBound``) and ``scale`` a per-step constant the strategy derives from the weights. Staleness τ_i
= v − base_version_i.

- FedAvg (synchronous rounds): w_i = n_i (sample count), scale = η / Σ w_i. With η = 1 and full updates this
  is the exact weighted average Σ n_i x_i / Σ n_i. A round steps once ``min_clients`` updates are in, or after
  ``round_timeout`` seconds with at least one.
- FedBuff (Nguyen et al. 2022): step after K updates; w_i = s(τ_i), scale = η / K, i.e. x + η · Σ s(τ_i) Δ_i /
  K. Dividing by K and not by Σ s(τ_i) makes stale updates move the model less instead of being renormalised
  back to full strength.
- FedAsync (Xie et al. 2019): a step per update; w = α · s(τ), scale = 1, i.e. x + α s(τ) Δ, which for a full
  update is exactly (1 − α s(τ)) x + α s(τ) x_client.

Staleness functions (``staleness_fn``): ``constant`` s = 1; ``polynomial:a`` s = (τ + 1)^−a (a = 0.5 gives the
FedBuff weight 1/√(1+τ)); ``hinge:a:b`` s = 1 for τ ≤ b, else 1 / (a (τ − b) + 1).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fedq.errors import ConfigError

StalenessFn = Callable[[int], float]


@dataclass(frozen=True)
class Candidate:
    """A committed update as the leader sees it when planning a version."""

    update_id: str
    client: str
    base_version: int
    num_samples: int
    norm: float  # L2 norm of the update's delta over every shard
    committed_at: float  # seconds (time.monotonic) when the last shard reported it complete


def staleness_fn(spec: str) -> StalenessFn:
    """Parse ``constant``, ``polynomial:a`` or ``hinge:a:b`` into s(τ)."""
    name, *params = spec.split(":")
    try:
        values = [float(p) for p in params]
    except ValueError:
        raise ConfigError(f"staleness function {spec!r}: parameters must be numbers") from None
    if name == "constant" and not values:
        return lambda tau: 1.0
    if name == "polynomial" and len(values) == 1 and values[0] >= 0:
        a = values[0]
        return lambda tau: (tau + 1.0) ** -a
    if name == "hinge" and len(values) == 2 and values[0] >= 0 and values[1] >= 0:
        a, b = values
        return lambda tau: 1.0 if tau <= b else 1.0 / (a * (tau - b) + 1.0)
    raise ConfigError(
        f"staleness function {spec!r}: expected constant, polynomial:A (A >= 0) or hinge:A:B (A, B >= 0)"
    )


class Strategy(abc.ABC):
    """Chooses the updates of the next version and their weights; pure, no I/O, no clock of its own."""

    name: str

    @abc.abstractmethod
    def select(self, pending: Sequence[Candidate], waited: float) -> list[Candidate]:
        """The updates (in commit order) to fold into the next version now, or [] to keep waiting.

        ``waited`` is how long (seconds) the current version has existed.
        """

    @abc.abstractmethod
    def weight(self, candidate: Candidate, staleness: int) -> float:
        """w_i of the module docstring."""

    def robust_weight(self, candidate: Candidate, staleness: int) -> float:
        """wᵢ where a robust rule or differential privacy is on: only what the server knows counts (the
        staleness), not what the client claims (FedAvg's sample count)."""
        return self.weight(candidate, staleness)

    @abc.abstractmethod
    def scale(self, weights: Sequence[float]) -> float:
        """The step's multiplier for Σ f_i Δ_i, given the selected updates' w_i."""

    @abc.abstractmethod
    def config(self) -> dict[str, Any]:
        """Parameters announced to clients with each version."""


class FedAvg(Strategy):
    name = "fedavg"

    def __init__(self, *, min_clients: int, round_timeout: float, server_lr: float = 1.0) -> None:
        if min_clients < 1 or round_timeout <= 0 or server_lr <= 0:
            raise ConfigError("fedavg needs min_clients >= 1, round_timeout > 0 and server_lr > 0")
        self.min_clients = min_clients
        self.round_timeout = round_timeout
        self.server_lr = server_lr

    def select(self, pending: Sequence[Candidate], waited: float) -> list[Candidate]:
        if len(pending) >= self.min_clients or (pending and waited >= self.round_timeout):
            return list(pending)
        return []

    def weight(self, candidate: Candidate, staleness: int) -> float:
        return float(candidate.num_samples)

    def robust_weight(self, candidate: Candidate, staleness: int) -> float:
        return 1.0

    def scale(self, weights: Sequence[float]) -> float:
        return self.server_lr / sum(weights)

    def config(self) -> dict[str, Any]:
        return {"strategy": self.name, "min_clients": self.min_clients, "server_lr": self.server_lr}


class FedBuff(Strategy):
    name = "fedbuff"

    def __init__(
        self, *, buffer_size: int, server_lr: float, staleness: str, distinct_clients: bool = False
    ) -> None:
        if buffer_size < 1 or server_lr <= 0:
            raise ConfigError("fedbuff needs buffer_size >= 1 and server_lr > 0")
        self.buffer_size = buffer_size
        # K updates from K different clients (the earliest of each): one client cannot fill the buffer alone
        self.distinct_clients = distinct_clients
        self.server_lr = server_lr
        self.staleness_spec = staleness
        self.s = staleness_fn(staleness)

    def select(self, pending: Sequence[Candidate], waited: float) -> list[Candidate]:
        if self.distinct_clients:
            firsts: dict[str, Candidate] = {}
            for c in pending:
                firsts.setdefault(c.client, c)
            pending = list(firsts.values())
        return list(pending[: self.buffer_size]) if len(pending) >= self.buffer_size else []

    def weight(self, candidate: Candidate, staleness: int) -> float:
        return self.s(staleness)

    def scale(self, weights: Sequence[float]) -> float:
        return self.server_lr / self.buffer_size

    def config(self) -> dict[str, Any]:
        return {
            "strategy": self.name,
            "buffer_size": self.buffer_size,
            "server_lr": self.server_lr,
            "staleness": self.staleness_spec,
        }


class FedAsync(Strategy):
    name = "fedasync"

    def __init__(self, *, alpha: float, staleness: str) -> None:
        if not 0 < alpha <= 1:
            raise ConfigError(f"fedasync needs 0 < alpha <= 1, got {alpha}")
        self.alpha = alpha
        self.staleness_spec = staleness
        self.s = staleness_fn(staleness)

    def select(self, pending: Sequence[Candidate], waited: float) -> list[Candidate]:
        return list(pending[:1])

    def weight(self, candidate: Candidate, staleness: int) -> float:
        return self.alpha * self.s(staleness)

    def scale(self, weights: Sequence[float]) -> float:
        return 1.0

    def config(self) -> dict[str, Any]:
        return {"strategy": self.name, "alpha": self.alpha, "staleness": self.staleness_spec}


@dataclass(frozen=True)
class NormBound:
    """Bounds what one update can do to the model: ‖Δ‖₂ ≤ ``bound`` (0 = off).

    ``clip`` scales an offending update down to the bound (c = bound / ‖Δ‖); otherwise it is rejected. Either
    way no single update moves the model by more than scale · w · bound.
    """

    bound: float = 0.0
    clip: bool = True

    def factor(self, norm: float) -> float | None:
        """The clip factor c for an update of this norm, or None when the update must be rejected."""
        if self.bound <= 0 or norm <= self.bound:
            return 1.0
        if not math.isfinite(norm) or not self.clip:
            return None
        return self.bound / norm


def limit_shares(weights: Sequence[float], clients: Sequence[str], max_share: float) -> list[float]:
    """The weights with no client's total above ``max_share`` of the sum (FedAvg's num_samples are the
    client's own claim): an offending client's weights are scaled down until its share is ``max_share``.
    Only where at least two clients contribute (one client's step is its own delta however it is weighted),
    and never below what ``max_share`` allows: with k clients a share below 1/k cannot be met by all."""
    totals: dict[str, float] = {}
    for w, c in zip(weights, clients, strict=True):
        totals[c] = totals.get(c, 0.0) + w
    if max_share >= 1.0 or len(totals) < 2:
        return list(weights)
    share = max(max_share, 1.0 / len(totals))
    factor = {c: 1.0 for c in totals}
    for _ in range(len(totals)):
        total = sum(totals[c] * factor[c] for c in totals)
        over = [c for c in totals if totals[c] * factor[c] > share * total * (1 + 1e-12)]
        if not over:
            break
        for c in over:
            rest = total - totals[c] * factor[c]
            factor[c] = share * rest / ((1 - share) * totals[c]) if totals[c] > 0 else 0.0
    return [w * factor[c] for w, c in zip(weights, clients, strict=True)]


def make_strategy(
    name: str,
    *,
    buffer_size: int,
    server_lr: float,
    alpha: float,
    staleness: str,
    min_clients: int,
    round_timeout: float,
    distinct_clients: bool = False,
) -> Strategy:
    """The strategy named on the command line, with the options that apply to it."""
    if name == "fedavg":
        return FedAvg(min_clients=min_clients, round_timeout=round_timeout, server_lr=server_lr)
    if name == "fedbuff":
        return FedBuff(
            buffer_size=buffer_size,
            server_lr=server_lr,
            staleness=staleness,
            distinct_clients=distinct_clients,
        )
    if name == "fedasync":
        return FedAsync(alpha=alpha, staleness=staleness)
    raise ConfigError(f"unknown strategy {name!r}; expected fedavg, fedbuff or fedasync")

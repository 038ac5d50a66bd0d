"""Byzantine-robust aggregation rules over a version's K updates, at any model size.

Rows. Each planned update i contributes a row rᵢ = kᵢ Δᵢ, where kᵢ is the server-side factor (staleness
weight, norm clip) scaled so that the plain mean of the rows is the strategy's own step (``Planner``). A
robust rule replaces that mean by a robust estimate of the rows' centre. The client's claimed ``num_samples``
plays no part: an attacker chooses it.

Two kinds of rule, both computed from staging without ever holding K updates in memory:

- Window rules (coordinate-wise): ``median`` (Yin et al. 2018; the mean of the two middle values for even K)
  and ``trimmed-mean`` (drop the ⌊βK⌋ largest and smallest values of each coordinate, average the rest). The
  fold decodes the K rows of one window (a slice of one tensor) into a K × w matrix and reduces it: memory is
  the model plus K × one window.
- Gram rules (whole-update): ``krum`` / ``multi-krum`` (Blanchard et al. 2017) and ``centered-clipping``
  (Karimireddy et al. 2021) need only inner products between whole updates. Each shard accumulates the
  K × K Gram matrix Gᵢⱼ = ⟨Δᵢ, Δⱼ⟩ of its tensors window by window (K² scalars), the leader sums the shards'
  matrices and turns them into one coefficient aᵢ per update: the step is Σ aᵢ rᵢ, folded like FedAvg.
  Pairwise squared distances (what Krum needs; they sum over shards like G) follow from G:
  ‖rᵢ − rⱼ‖² = Gʳᵢᵢ + Gʳⱼⱼ − 2Gʳᵢⱼ with Gʳ = k kᵀ ∘ G.

Everything here is pure (tensors and arrays in, tensors and coefficients out).
"""

from __future__ import annotations

import abc
import functools
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from fedq.errors import ConfigError


class Rule(abc.ABC):
    """How a version's rows become its step."""

    name: str
    kind: str  # "window" or "gram"

    @abc.abstractmethod
    def config(self) -> dict[str, Any]:
        """Parameters (announced with each version, and carried by each plan)."""

    def accepts(self, k: int) -> bool:
        """Whether K updates are enough for the rule's guarantee (the planner waits for more otherwise)."""
        return k >= 1


class WindowRule(Rule):
    kind = "window"

    @abc.abstractmethod
    def reduce(self, rows: torch.Tensor) -> torch.Tensor:
        """The step over one window from its K × w rows."""


class GramRule(Rule):
    kind = "gram"

    @abc.abstractmethod
    def coefficients(self, gram: np.ndarray) -> list[float]:
        """aᵢ such that the step is Σ aᵢ rᵢ, from the rows' Gram matrix Gʳ (K × K, float64)."""


class Median(WindowRule):
    name = "median"

    def reduce(self, rows: torch.Tensor) -> torch.Tensor:
        k = rows.shape[0]
        out = torch.empty_like(rows[0])
        for lo, middle in sorted_blocks(rows, range((k - 1) // 2, k // 2 + 1)):
            o = out[lo : lo + middle[0].numel()]
            if len(middle) == 1:
                o.copy_(middle[0])
            else:
                torch.add(middle[0], middle[1], out=o).mul_(0.5)
        return out

    def config(self) -> dict[str, Any]:
        return {"rule": self.name}


class TrimmedMean(WindowRule):
    name = "trimmed-mean"

    def __init__(self, trim: float) -> None:
        if not 0 <= trim < 0.5:
            raise ConfigError(f"trimmed-mean: --trim must be in [0, 0.5), got {trim}")
        self.trim = trim

    def reduce(self, rows: torch.Tensor) -> torch.Tensor:
        k = rows.shape[0]
        b = math.floor(self.trim * k)
        out = torch.empty_like(rows[0])
        for lo, kept in sorted_blocks(rows, range(b, k - b)):
            o = out[lo : lo + kept[0].numel()].copy_(kept[0])
            for v in kept[1:]:
                o.add_(v)
            o.div_(len(kept))
        return out

    def config(self) -> dict[str, Any]:
        return {"rule": self.name, "trim": self.trim}


# Bytes of rows sorted at once (K × columns × 4): a block stays in a core's L2 cache (2 MiB here) through the
# network's passes, and is wide enough that torch's per-call overhead stays small. Median, K = 32, one thread,
# on the shared 2-core VM: 33, 96, 212, 172 M elements/s at 0.5, 1, 2, 4 MiB blocks; the network over a
# whole 2 Mi-column sub-window at once (every pass from memory), 15-24 M/s.
_BLOCK_BYTES = 2 << 20


def sorted_blocks(rows: torch.Tensor, wanted: range) -> Iterator[tuple[int, list[torch.Tensor]]]:
    """The ranks ``wanted`` of each column of a K × w matrix, block of columns by block: yields (first
    column, [the rank-r values of the block's columns for r in wanted]). Scratches ``rows``; a block's values
    are valid until the next is asked for.

    Batcher's odd-even merge sorting network, pruned to the comparators that lead to a wanted rank: element-
    wise min/max over whole rows (K log² K of them at most), against 3-21 M elements/s for torch's
    sort/kthvalue/median along dim 0 (strided columns). A comparator writes its minimum into a spare row and
    its maximum over one input; the rows then trade places in the list instead of copying."""
    k, w = rows.shape
    network = _pruned(k, wanted.start, wanted.stop)
    columns = block_columns(k)
    for lo in range(0, w, columns):
        order = list(rows[:, lo : lo + columns].unbind(0))
        spare = torch.empty_like(order[0])
        for a, b in network:
            torch.minimum(order[a], order[b], out=spare)
            torch.maximum(order[a], order[b], out=order[b])
            order[a], spare = spare, order[a]
        yield lo, order[wanted.start : wanted.stop]


def block_columns(k: int) -> int:
    """Columns of a K-row block that ``sorted_blocks`` sorts at once."""
    return max(1024, _BLOCK_BYTES // (4 * k))


@functools.cache
def _pruned(k: int, start: int, stop: int) -> tuple[tuple[int, int], ...]:
    """The comparators of ``_network(k)`` on which ranks ``start .. stop`` depend: walking back from the
    outputs, a comparator that touches a needed position is kept and makes both its inputs needed."""
    needed = set(range(start, stop))
    kept = []
    for a, b in reversed(_network(k)):
        if a in needed or b in needed:
            kept.append((a, b))
            needed |= {a, b}
    return tuple(reversed(kept))


@functools.cache
def _network(k: int) -> tuple[tuple[int, int], ...]:
    """The comparators of Batcher's odd-even merge sort for K inputs: those of the next power of two, less
    those that touch a padding input (padding is +inf, which such a comparator would never move)."""
    n = 1 << max(0, (k - 1).bit_length())
    pairs = []
    p = 1
    while p < n:
        step = p
        while step >= 1:
            for j in range(step % p, n - step, 2 * step):
                for i in range(min(step, n - j - step)):
                    if (i + j) // (p * 2) == (i + j + step) // (p * 2) and i + j + step < k:
                        pairs.append((i + j, i + j + step))
            step //= 2
        p *= 2
    return tuple(pairs)


def sub_windows(lo: int, hi: int, k: int, budget: int) -> list[tuple[int, int]]:
    """Split a fold window so that K rows of a piece fit in ``budget`` bytes (float32): memory stays flat in
    K, at the price of decoding a chunk once per piece when K × window exceeds the budget."""
    step = max(1, budget // (4 * max(k, 1)))
    return [(a, min(a + step, hi)) for a in range(lo, hi, step)]


def squared_distances(gram: np.ndarray) -> np.ndarray:
    """‖rᵢ − rⱼ‖² from the Gram matrix (clamped at 0 against rounding)."""
    diag = np.diag(gram)
    return np.maximum(diag[:, None] + diag[None, :] - 2.0 * gram, 0.0)


class Krum(GramRule):
    """Krum (``select`` = 1) and Multi-Krum: score each row by the sum of its squared distances to its
    K − f − 2 nearest other rows, average the ``select`` rows with the lowest scores (0: K − f of them).
    Tolerates f Byzantine updates out of K when K > 2f + 2."""

    def __init__(self, byzantine: int, select: int = 1) -> None:
        if byzantine < 0 or select < 0:
            raise ConfigError(
                f"krum needs --byzantine >= 0 and --krum-select >= 0, got {byzantine}, {select}"
            )
        self.byzantine, self.select = byzantine, select
        self.name = "krum" if select == 1 else "multi-krum"

    def accepts(self, k: int) -> bool:
        return k > 2 * self.byzantine + 2 and k >= self.select

    def require(self, k: int) -> None:
        """Raise ConfigError when the strategy's K (updates per version) can never satisfy Krum."""
        if not self.accepts(k):
            raise ConfigError(
                f"{self.name} with --byzantine {self.byzantine} needs more than {2 * self.byzantine + 2} "
                f"updates per version (and at least --krum-select {self.select}), the strategy makes "
                f"versions of {k}"
            )

    def scores(self, gram: np.ndarray) -> np.ndarray:
        k = gram.shape[0]
        dist = squared_distances(gram)
        nearest = k - self.byzantine - 2
        return np.array([np.sort(np.delete(dist[i], i))[:nearest].sum() for i in range(k)])

    def coefficients(self, gram: np.ndarray) -> list[float]:
        k = gram.shape[0]
        select = self.select or k - self.byzantine
        chosen = set(np.argsort(self.scores(gram), kind="stable")[:select].tolist())
        return [1.0 / select if i in chosen else 0.0 for i in range(k)]

    def config(self) -> dict[str, Any]:
        return {"rule": self.name, "byzantine": self.byzantine, "select": self.select}


class CenteredClipping(GramRule):
    """Centered clipping from v₀ = 0: vₗ₊₁ = vₗ + (1/K) Σ (rᵢ − vₗ) min(1, ρ / ‖rᵢ − vₗ‖), ``iterations``
    times. Each vₗ stays in the span of the rows (vₗ = Σ aᵢ rᵢ), so its distances come from G alone. The
    radius ρ defaults (0) to the median row norm: a row far from the centre pulls no harder than a typical
    one."""

    name = "centered-clipping"

    def __init__(self, radius: float, iterations: int) -> None:
        if radius < 0 or iterations < 1:
            raise ConfigError("centered-clipping needs --cc-radius >= 0 and --cc-iterations >= 1")
        self.radius, self.iterations = radius, iterations

    def coefficients(self, gram: np.ndarray) -> list[float]:
        k = gram.shape[0]
        radius = self.radius or float(np.median(np.sqrt(np.maximum(np.diag(gram), 0.0))))
        a = np.zeros(k)
        for _ in range(self.iterations):
            # ‖rᵢ − v‖² = Gᵢᵢ − 2 (G a)ᵢ + aᵀ G a
            ga = gram @ a
            dist = np.sqrt(np.maximum(np.diag(gram) - 2.0 * ga + a @ ga, 0.0))
            c = np.minimum(1.0, radius / np.maximum(dist, 1e-300))
            a = a * (1.0 - c.mean()) + c / k
        return a.tolist()

    def config(self) -> dict[str, Any]:
        return {"rule": self.name, "radius": self.radius, "iterations": self.iterations}


RULES = ("mean", "median", "trimmed-mean", "krum", "multi-krum", "centered-clipping")


def make_rule(
    name: str, *, trim: float, byzantine: int, krum_select: int, cc_radius: float, cc_iterations: int
) -> Rule | None:
    """The rule named on the command line (None for the plain mean, the strategy's own step)."""
    if name == "mean":
        return None
    if name == "median":
        return Median()
    if name == "trimmed-mean":
        return TrimmedMean(trim)
    if name == "krum":
        return Krum(byzantine, 1)
    if name == "multi-krum":
        return Krum(byzantine, krum_select)
    if name == "centered-clipping":
        return CenteredClipping(cc_radius, cc_iterations)
    raise ConfigError(f"unknown aggregation rule {name!r}; expected one of {', '.join(RULES)}")


def rule_from_config(config: dict[str, Any] | None) -> Rule | None:
    """The rule a plan carries (``Rule.config``), so that every shard applies the leader's rule."""
    if not config:
        return None
    name = config["rule"]
    return make_rule(
        name,
        trim=float(config.get("trim", 0.0)),
        byzantine=int(config.get("byzantine", 0)),
        krum_select=int(config.get("select", 1)),
        cc_radius=float(config.get("radius", 0.0)),
        cc_iterations=int(config.get("iterations", 1)),
    )


def row_gram(raw: np.ndarray, factors: list[float]) -> np.ndarray:
    """Gʳ = k kᵀ ∘ G: the rows' Gram matrix from the raw deltas' one and the row factors kᵢ."""
    k = np.asarray(factors, dtype=np.float64)
    return raw * np.outer(k, k)

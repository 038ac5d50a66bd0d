"""Central differential privacy at the aggregator (DP-FedAvg, McMahan et al. 2018; adaptive clipping, Andrew
et al. 2021), user-level: what is protected is whether one client's update took part in a version.

- Clipping: every update's delta is scaled to ‖Δ‖ ≤ C (the planner's norm clip). C is fixed, or adapted each
  version towards the ``target_quantile`` γ of the update norms: C ← C · exp(−η_C (b̃ − γ)), where b̃ is the
  fraction of updates with ‖Δ‖ ≤ C plus Gaussian noise of std σ_b / K (the count is private too).
- Noise: once per version, N(0, (z_Δ · S)²) on every coordinate of the step, where S = scale · max wᵢ · C is
  what one clipped update can move the step by. Each window's noise comes from a generator seeded by
  (the version's seed, tensor, window start), and the version's seed from (the federation's seed, version):
  the noise of a version is the same on one shard or several, and after any restart. The federation's seed is
  kept in the leader's checkpoint; each plan carries its version's seed to the other shards.
- Accounting: each version is a Poisson-sampled Gaussian mechanism with sampling rate q = K / population and
  noise multiplier z, composed over versions by dp-accounting's RDP accountant; ε at the configured δ is
  recomputed after every version. With adaptive clipping the count's noise spends budget too: the model's
  noise multiplier is z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2), so that the two together cost what z alone would.
- Budget: a version whose ε would exceed the budget is not made; the federation stops there.

The accountant's assumption, said plainly: clients take part in a version independently with probability q.
An asynchronous federation (FedBuff) approximates this; the ε reported is the one of that model.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedq.errors import ConfigError


@dataclass(frozen=True)
class DpConfig:
    noise_multiplier: float  # z: noise std / sensitivity, as the accountant sees it
    clip: float  # C, or its initial value when adaptive
    population: int  # clients that may take part (q = K / population)
    delta: float = 1e-5
    epsilon_budget: float = 0.0  # 0 = no budget
    target_quantile: float = 0.0  # γ; 0 = fixed clip
    clip_lr: float = 0.2  # η_C
    count_std: float = 0.0  # σ_b (in clients); 0 with adaptive clipping = K / 20

    def __post_init__(self) -> None:
        if self.noise_multiplier <= 0 or self.clip <= 0 or self.population < 1:
            raise ConfigError("DP needs --dp-noise > 0, --dp-clip > 0 and --dp-population >= 1")
        if not 0 < self.delta < 1 or self.epsilon_budget < 0:
            raise ConfigError("DP needs 0 < --dp-delta < 1 and --dp-budget >= 0")
        if not 0 <= self.target_quantile < 1 or self.clip_lr <= 0 or self.count_std < 0:
            raise ConfigError("DP needs 0 <= --dp-quantile < 1, --dp-clip-lr > 0 and --dp-count-std >= 0")


def model_noise_multiplier(z: float, count_std: float) -> float:
    """z_Δ: the model's share of a total noise multiplier z when the clip count is noised with σ_b."""
    if count_std <= 0:
        return z
    rest = z**-2 - (2.0 * count_std) ** -2
    if rest <= 0:
        raise ConfigError(
            f"adaptive clipping: the count noise (std {count_std}) leaves no budget for the model at "
            f"--dp-noise {z}; raise --dp-count-std above {z / 2:g} or --dp-noise"
        )
    return rest**-0.5


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (stable across processes and platforms, unlike ``hash``)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & ((1 << 63) - 1)


NOISE_BLOCK = 1 << 16  # elements: noise is drawn per aligned block of a tensor, whatever the fold's windows


def window_noise(seed: int, name: str, lo: int, count: int, std: float, device: torch.device) -> torch.Tensor:
    """The version's noise for elements lo .. lo+count of tensor ``name`` (flattened), N(0, std²).

    Drawn per aligned block of ``NOISE_BLOCK`` elements, each from its own generator seeded by (seed, tensor,
    block): the same element gets the same noise however the fold cuts the tensor into windows (chunk sizes,
    sub-windows, threads), on one shard or several, before or after a restart."""
    out = torch.empty(count, dtype=torch.float32, device=device)
    gen = torch.Generator(device=device)
    hi = lo + count
    for block in range(lo // NOISE_BLOCK, (hi - 1) // NOISE_BLOCK + 1):
        start = block * NOISE_BLOCK
        gen.manual_seed(derive_seed(seed, name, block))
        noise = torch.randn(NOISE_BLOCK, generator=gen, device=device, dtype=torch.float32)
        a, b = max(lo, start), min(hi, start + NOISE_BLOCK)
        out[a - lo : b - lo] = noise[a - start : b - start]
    return out.mul_(std)


def epsilon(rates: dict[float, int], noise_multiplier: float, delta: float) -> float:
    """ε at ``delta`` after the versions so far (``rates``: sampling rate -> how many versions had it)."""
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant

    # the accountant logs a warning for each low order whose series does not converge, and leaves it out of
    # the minimum (correctly); once per version that is noise in the aggregator's log
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        accountant = rdp_privacy_accountant.RdpAccountant()
        for q, count in rates.items():
            event = dp_event.GaussianDpEvent(noise_multiplier)
            accountant.compose(dp_event.PoissonSampledDpEvent(min(1.0, q), event), count)
        return float(accountant.get_epsilon(delta))
    finally:
        absl.setLevel(level)


@dataclass
class Privacy:
    """The leader's DP state: the clip of the next version, the accounting so far, the federation's seed."""

    config: DpConfig
    seed: int
    clip: float = 0.0
    rates: dict[float, int] = field(default_factory=dict)
    spent: float = 0.0  # ε so far

    def __post_init__(self) -> None:
        self.clip = self.clip or self.config.clip
        try:
            import dp_accounting  # noqa: F401
        except ImportError:
            raise ConfigError(
                "differential privacy needs the dp-accounting package: pip install 'fedq[dp]'"
            ) from None

    def count_std(self, k: int) -> float:
        if not self.config.target_quantile:
            return 0.0
        return self.config.count_std or k / 20.0

    def epsilon_after(self, k: int, versions: int = 1) -> float:
        """ε if ``versions`` more versions of K updates each are made."""
        rates = dict(self.rates)
        q = k / self.config.population
        rates[q] = rates.get(q, 0) + versions
        return epsilon(rates, self.config.noise_multiplier, self.config.delta)

    def noise_std(self, sensitivity: float, k: int) -> float:
        """The std of the noise on each coordinate of a step whose sensitivity to one update is given."""
        z = model_noise_multiplier(self.config.noise_multiplier, self.count_std(k))
        return z * sensitivity

    def version_seed(self, version: int) -> int:
        return derive_seed(self.seed, "version", version)

    def next_clip(self, version: int, norms: list[float]) -> float:
        """The clip after a version of updates with these norms: adapted towards the target quantile, from a
        noised count (its noise seeded by the version, so a replayed plan computes the same clip)."""
        if not self.config.target_quantile:
            return self.clip
        k = len(norms)
        rng = np.random.default_rng(derive_seed(self.seed, "count", version))
        below = sum(1 for n in norms if n <= self.clip) + rng.normal(0.0, self.count_std(k))
        return self.clip * math.exp(-self.config.clip_lr * (below / k - self.config.target_quantile))

    def account(self, dp: dict[str, Any]) -> None:
        """Book a made version (the ``dp`` record of its plan): its sampling rate, the ε so far, the clip of
        the next version."""
        rate = float(dp["rate"])
        self.rates[rate] = self.rates.get(rate, 0) + 1
        self.spent = float(dp["epsilon"])
        self.clip = float(dp["next_clip"])

    def state(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "clip": self.clip,
            "rates": [[q, n] for q, n in self.rates.items()],
            "spent": self.spent,
        }

    def load(self, state: dict[str, Any]) -> None:
        """Restore ``state`` (the federation's seed included: it was drawn when the federation started)."""
        self.seed = int(state["seed"])
        self.clip = float(state["clip"])
        self.rates = {float(q): int(n) for q, n in state["rates"]}
        self.spent = float(state["spent"])

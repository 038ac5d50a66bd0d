"""Server optimizers (Reddi et al., "Adaptive Federated Optimization", ICLR 2021) over each version's
pseudo-gradient.

The strategy's step of a version, d = scale · Σ fᵢ Δᵢ (see ``strategies``), is what FedAvg would add to the
model. A server optimizer treats d as the (negated) pseudo-gradient and adds its own step instead:

- ``avgm`` (FedAvgM):     m ← β₁ m + d;                                   x ← x + η m
- ``adam`` (FedAdam):     m ← β₁ m + (1 − β₁) d;  v ← β₂ v + (1 − β₂) d²;   x ← x + η m / (√v + τ)
- ``yogi`` (FedYogi):     m as Adam;  v ← v − (1 − β₂) d² sign(v − d²);     x ← x + η m / (√v + τ)
- ``adagrad`` (FedAdagrad): m as Adam; v ← v + d²;                           x ← x + η m / (√v + τ)

No bias correction, as in the paper. The state (m, and v for the adaptive ones) has the model's shape, lives
on the fold device next to the model of this shard, and is written into the same checkpoint file as the
model, so a version's model and optimizer state commit together (``checkpoint``). The update is
element-wise, so the fold applies it window by window, in any order, from several threads at once: windows
are disjoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedq.errors import ConfigError

# Prefix of the optimizer's tensors in a checkpoint file; model tensor names never start with it (checked).
STATE_PREFIX = "fedq.server_opt/"

NAMES = ("avgm", "adam", "yogi", "adagrad")
# η by default: FedAvgM with η = 1 is FedAvg plus momentum; the adaptive ones normalise the step per element,
# so η is an absolute step size per element and must be small for LLM weights.
DEFAULT_LR = {"avgm": 1.0, "adam": 0.01, "yogi": 0.01, "adagrad": 0.01}


@dataclass(frozen=True)
class ServerOptConfig:
    """The optimizer and its hyper-parameters (the same on every shard)."""

    name: str
    lr: float = 0.0  # 0: DEFAULT_LR of the optimizer
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if self.name not in NAMES:
            raise ConfigError(f"unknown server optimizer {self.name!r}; expected one of {', '.join(NAMES)}")
        if not (self.lr >= 0 and 0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and self.tau > 0):
            raise ConfigError(
                f"server optimizer {self.name}: needs --server-opt-lr >= 0, 0 <= --server-beta1 < 1, "
                f"0 <= --server-beta2 < 1 and --server-tau > 0"
            )


class ServerOptimizer:
    """One of ``NAMES`` over the tensors of one shard; ``step`` turns a window of d into the model's step."""

    def __init__(
        self, config: ServerOptConfig, shapes: dict[str, tuple[int, ...]], device: torch.device | str = "cpu"
    ) -> None:
        name = config.name
        self.name, self.beta1, self.beta2, self.tau = name, config.beta1, config.beta2, config.tau
        self.lr = config.lr or DEFAULT_LR[name]
        self.slots = ("m",) if name == "avgm" else ("m", "v")
        device = torch.device(device)
        self.state: dict[str, dict[str, torch.Tensor]] = {
            slot: {
                n: torch.zeros(math.prod(s), dtype=torch.float32, device=device) for n, s in shapes.items()
            }
            for slot in self.slots
        }

    def step(self, name: str, lo: int, d: torch.Tensor) -> torch.Tensor:
        """Update the state of elements ``lo .. lo+len(d)`` of tensor ``name`` (flattened) with the strategy's
        step ``d`` and return the optimizer's step for them, computed in place in ``d``."""
        hi = lo + d.numel()
        m = self.state["m"][name][lo:hi]
        if self.name == "avgm":
            m.mul_(self.beta1).add_(d)
            return torch.mul(m, self.lr, out=d)
        v = self.state["v"][name][lo:hi]
        m.mul_(self.beta1).add_(d, alpha=1.0 - self.beta1)
        if self.name == "adam":
            v.mul_(self.beta2).addcmul_(d, d, value=1.0 - self.beta2)
        elif self.name == "adagrad":
            v.addcmul_(d, d)
        else:  # yogi
            d2 = d * d
            v.addcmul_(d2, torch.sign(v - d2), value=-(1.0 - self.beta2))
        torch.sqrt(v, out=d).add_(self.tau)
        return torch.div(m, d, out=d).mul_(self.lr)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The state as named flat tensors, for the checkpoint file."""
        return {f"{STATE_PREFIX}{slot}/{n}": t for slot, by in self.state.items() for n, t in by.items()}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore the state written by ``tensors`` (a checkpoint without it, e.g. one written before the
        optimizer was configured, leaves the zero state)."""
        for slot, by in self.state.items():
            for n, t in by.items():
                saved = tensors.get(f"{STATE_PREFIX}{slot}/{n}")
                if saved is not None:
                    t.copy_(saved.reshape(-1))

    def config(self) -> dict[str, float | str]:
        return {"server_opt": self.name, "server_opt_lr": self.lr}

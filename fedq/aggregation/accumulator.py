"""The running sum an aggregator folds updates into: Σ wᵢ·Δᵢ per tensor, plus Σ wᵢ and the update count.

Sums are float32 on the fold device whatever the wire codec, so folding order changes the result only by float
rounding. Tensors are allocated on first touch and can be released one at a time (``pop``): the service folds
tensor by tensor, so at most one tensor's accumulator needs to be alive next to the global model; the
aggregator service goes further and folds one window (a chunk's slice) at a time into ``window``'s buffer.
"""

from __future__ import annotations

import torch


class Accumulator:
    """Weighted sums of update slices, keyed by tensor name."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], device: torch.device | str = "cpu") -> None:
        self.shapes = dict(shapes)
        self.device = torch.device(device)
        self.sums: dict[str, torch.Tensor] = {}
        self.weight_sum = 0.0
        self.count = 0
        self._window: torch.Tensor | None = None

    def fold(self, name: str, offset: int, values: torch.Tensor, weight: float) -> None:
        """Add ``weight * values`` to elements ``offset .. offset+len(values)`` of tensor ``name``
        (flattened)."""
        flat = self._sum(name)
        n = values.numel()
        if offset < 0 or offset + n > flat.numel():
            raise ValueError(f"slice {offset}+{n} outside the {flat.numel()} elements of {name!r}")
        flat[offset : offset + n].add_(values.reshape(-1).to(self.device, torch.float32), alpha=weight)

    def add_update(self, weight: float) -> None:
        """Count one folded update; kept apart from ``fold`` because an update spans many slices."""
        self.weight_sum += weight
        self.count += 1

    def window(self, count: int) -> torch.Tensor:
        """A zeroed float32 scratch sum of ``count`` elements for windowed folding (``x[lo:hi] += scale ·
        Σ fᵢ Δᵢ[lo:hi]`` one window at a time). Its buffer is kept and reused by the next call: fresh memory
        costs page faults on every window, and the fold then never holds more than the largest window."""
        if self._window is None or self._window.numel() < count:
            self._window = None  # the old buffer goes before the larger one comes
            self._window = torch.empty(count, dtype=torch.float32, device=self.device)
        return self._window[:count].zero_()

    def get(self, name: str) -> torch.Tensor:
        """The sum for ``name`` in its shape (zeros when nothing was folded into it)."""
        return self._sum(name).view(self.shapes[name])

    def pop(self, name: str) -> torch.Tensor:
        """Like ``get``, and forget the tensor so its memory is freed once the caller drops it."""
        flat = self.sums.pop(name, None)
        if flat is None:
            flat = torch.zeros(_numel(self.shapes[name]), dtype=torch.float32, device=self.device)
        return flat.view(self.shapes[name])

    def _sum(self, name: str) -> torch.Tensor:
        flat = self.sums.get(name)
        if flat is None:
            if name not in self.shapes:
                raise KeyError(f"unknown tensor {name!r}")
            flat = torch.zeros(_numel(self.shapes[name]), dtype=torch.float32, device=self.device)
            self.sums[name] = flat
        return flat


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n

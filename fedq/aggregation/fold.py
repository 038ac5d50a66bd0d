"""Folding a plan into the model, one window at a time: x[window] += scale · Σ fᵢ Δᵢ[window].

Each tensor is folded one window (one chunk of the planned update with the largest chunks) at a time: the
planned updates' staged chunks over the window are decoded (the only decode at plan time; a delta chunk
straight into the sum, without a decoded copy) and folded into a window-sized ``Accumulator`` buffer, then
added to the model (a lone delta goes into x directly). So memory is the global model + a chunk or two,
however many clients and however large a tensor. Windows are disjoint slices of the model, so they are folded
in any order, or at once on the cores torch leaves idle.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import torch

from fedq import wire
from fedq.aggregation.accumulator import Accumulator
from fedq.aggregation.admission import Admitted
from fedq.aggregation.staging import ChunkRef, StagingArea
from fedq.protocol import PlanEntry
from fedq.threads import ordered_map

# A fold window: (the tensor's flat view, lo, hi, the (fold factor, update, chunk) pieces over it)
Window = tuple[torch.Tensor, int, int, list[tuple[float, Admitted, ChunkRef]]]


class Folder:
    """Folds planned updates from their staging files into ``model`` (this shard's tensors, in place)."""

    def __init__(
        self, model: dict[str, torch.Tensor], staging: StagingArea, device: torch.device, threads: int
    ) -> None:
        self.model = model
        self.staging = staging
        self.device = device
        self.threads = threads

    def fold(self, entries: list[tuple[PlanEntry, Admitted]], scale: float) -> int:
        """x += scale · Σ fᵢ Δᵢ over the planned updates; returns the number of update elements folded."""
        local = threading.local()  # each fold thread's window sums, reused from window to window

        def fold(window: Window) -> int:
            if not hasattr(local, "acc"):
                local.acc = Accumulator({}, self.device)
            return self._fold_window(*window, scale, local.acc)

        return sum(ordered_map(fold, self._windows(entries), self.threads, "fedq-fold"))

    def _windows(self, entries: list[tuple[PlanEntry, Admitted]]) -> Iterator[Window]:
        """The plan's fold windows, each with the pieces of the planned updates that overlap it."""
        for name, tensor in self.model.items():
            flat = tensor.view(-1)
            parts = [(entry, c, c.by_tensor.get(name, [])) for entry, c in entries]
            for lo, hi in windows(flat.numel(), [refs for _, _, refs in parts]):
                pieces = [
                    (entry.factor, c, ref)
                    for entry, c, refs in parts
                    for ref in refs
                    if max(ref.offset, lo) < min(ref.offset + ref.count, hi)
                ]
                yield flat, lo, hi, pieces

    def _fold_window(
        self,
        flat: torch.Tensor,
        lo: int,
        hi: int,
        pieces: list[tuple[float, Admitted, ChunkRef]],
        scale: float,
        acc: Accumulator,
    ) -> int:
        """x[lo:hi] += scale · Σ fᵢ Δᵢ[lo:hi]; returns the number of update elements folded.

        A delta chunk that lies inside the window is decoded straight into its sum (``wire.add_tensor``: no
        decoded copy, measured 2.4x faster than decode-then-add for nf4); a lone delta chunk that is the
        window goes straight into the model. Otherwise the window buffer sums the updates first, so that the
        model is written once per window however many updates there are.
        """
        if len(pieces) == 1:
            factor, c, ref = pieces[0]
            if c.kind == "delta" and (ref.offset, ref.offset + ref.count) == (lo, hi):
                wire.add_tensor(self.staging.read(c.staged, ref), flat[lo:hi], scale * factor)
                return hi - lo
        window = acc.window(hi - lo)
        folded = 0
        for factor, c, ref in pieces:
            start, end = max(ref.offset, lo), min(ref.offset + ref.count, hi)
            if c.kind == "delta" and (start, end) == (ref.offset, ref.offset + ref.count):
                wire.add_tensor(self.staging.read(c.staged, ref), window[start - lo : end - lo], factor)
            else:
                values = self._decode(c, ref)[start - ref.offset : end - ref.offset]
                window[start - lo : end - lo].add_(values, alpha=factor)
            folded += end - start
        flat[lo:hi].add_(window, alpha=scale)
        return folded

    def _decode(self, c: Admitted, ref: ChunkRef) -> torch.Tensor:
        """A staged chunk as a delta slice on the fold device (full weights minus the current global)."""
        values = wire.decode_tensor(self.staging.read(c.staged, ref), self.device)
        if c.kind == "full":
            values = values - self.model[ref.name].reshape(-1)[ref.offset : ref.offset + ref.count]
        return values


def windows(numel: int, parts: list[list[ChunkRef]]) -> list[tuple[int, int]]:
    """The fold windows of one tensor: the chunk slices of the planned update with the largest chunks (every
    complete update covers the tensor exactly, so these cover it too; another update's chunk then overlaps at
    most two windows). Empty when no planned update has this tensor."""
    widest = max(parts, key=lambda refs: max((r.count for r in refs), default=0), default=[])
    if not widest:
        return []
    spans = [(r.offset, r.offset + r.count) for r in widest]
    assert spans[0][0] == 0 and spans[-1][1] == numel, "a complete update covers its tensors"
    return spans

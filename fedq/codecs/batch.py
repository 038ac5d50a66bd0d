"""Many small slices in one flat buffer, so that a codec encodes or decodes them in one op sequence.

A model of many small tensors (the demo's GPT: 28 tensors, 12 of 160 elements) is one chunk per tensor, and
a codec's dozen ops per call cost ~0.1 ms of Python and dispatch whatever the size: encoding an update a
chunk at a time, with error feedback, was ~4x the time of its arithmetic. ``Codec.encode_batch`` and its
decoders take the slices laid out here instead and give, slice by slice, exactly the bytes and values of one
call per slice (tests/test_codecs_batch.py), so a receiver cannot tell the difference.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Layout:
    """Slices one after another in a flat buffer: slice i's ``counts[i]`` elements at ``starts[i]``, a
    multiple of ``unit``, then zeros up to the next slice. A blockwise codec's blocks then never straddle two
    slices when ``unit`` is a multiple of its block, and zero padding changes no block's codes."""

    counts: tuple[int, ...]
    unit: int

    @functools.cached_property
    def starts(self) -> tuple[int, ...]:
        out, at = [], 0
        for n in self.counts:
            out.append(at)
            at += -(-n // self.unit) * self.unit
        return tuple(out)

    @functools.cached_property
    def total(self) -> int:
        """Elements of the flat buffer, padding included."""
        return sum(-(-n // self.unit) * self.unit for n in self.counts)

    def padded(self, i: int) -> int:
        """Elements slice i takes in the buffer (its count rounded up to the unit)."""
        return -(-self.counts[i] // self.unit) * self.unit

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Each slice's elements of ``flat``, as views."""
        return [flat[s : s + n] for s, n in zip(self.starts, self.counts, strict=True)]

    def part(self, lo: int, hi: int) -> tuple[int, int, Layout]:
        """Slices ``lo .. hi`` as a layout of their own, with the element range they take in this buffer."""
        first = self.starts[lo] if lo < len(self.counts) else self.total
        last = self.starts[hi] if hi < len(self.counts) else self.total
        return first, last, Layout(self.counts[lo:hi], self.unit)


def payload_spans(nbytes: list[int]) -> list[tuple[int, int]]:
    """[lo, hi) of each payload in payloads laid back to back."""
    out, at = [], 0
    for n in nbytes:
        out.append((at, at + n))
        at += n
    return out


# A batch's float32 buffers up to this size are kept for the next batch, at most _KEPT of them: freed, a
# sender's few MiB went back to the OS and were faulted in again at its next update (measured on the demo's
# update with error feedback: ~3000 page faults and ~4 ms of its CPU per send). Larger buffers (a large
# model's groups of 4 MiB chunks) are allocated each time, as before, so a lean client holds no more.
_KEEP_BYTES = 8 << 20
_KEPT = 2
_spare: list[torch.Tensor] = []
_spare_lock = threading.Lock()


def flat_buffer(layout: Layout, device: torch.device) -> torch.Tensor:
    """A float32 buffer for ``layout``, zero where no slice is (the slices are the caller's to fill)."""
    return buffer(layout.total, device).zero_()


def buffer(count: int, device: torch.device) -> torch.Tensor:
    """An uninitialised float32 buffer of ``count`` elements: one kept by ``release`` where one fits."""
    with _spare_lock:
        for i, spare in enumerate(_spare):
            if spare.device == device and spare.numel() >= count:
                return _spare.pop(i)[:count]
    return torch.empty(count, dtype=torch.float32, device=device)


def release(t: torch.Tensor) -> None:
    """Keep a buffer from ``buffer`` that the caller is done with (nothing else may view it) for the next
    batch, if it is small enough and fewer than ``_KEPT`` are kept."""
    whole = t._base if t._base is not None else t
    if whole.device.type != "cpu" or whole.numel() * 4 > _KEEP_BYTES:
        return
    with _spare_lock:
        if len(_spare) < _KEPT:
            _spare.append(whole)

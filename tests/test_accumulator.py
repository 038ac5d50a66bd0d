"""Folding chunk by chunk, in any order, equals folding whole tensors."""

from __future__ import annotations

import random

import pytest
import torch

from fedq.aggregation.accumulator import Accumulator


def test_chunks_in_any_order_equal_whole_tensors() -> None:
    g = torch.Generator().manual_seed(1)
    shapes = {"a": (37, 11), "b": (1000,), "c": (3,)}
    updates = [({n: torch.randn(s, generator=g) for n, s in shapes.items()}, w) for w in (1.0, 2.5, 0.25)]
    whole = Accumulator(shapes)
    for tensors, w in updates:
        for name, t in tensors.items():
            whole.fold(name, 0, t.reshape(-1), w)
        whole.add_update(w)
    pieces = []
    for tensors, w in updates:
        for name, t in tensors.items():
            flat = t.reshape(-1)
            for start in range(0, flat.numel(), 64):
                pieces.append((name, start, flat[start : start + 64], w))
    random.Random(7).shuffle(pieces)
    chunked = Accumulator(shapes)
    for name, start, values, w in pieces:
        chunked.fold(name, start, values, w)
    for _, w in updates:
        chunked.add_update(w)
    for name in shapes:
        torch.testing.assert_close(chunked.get(name), whole.get(name), rtol=1e-6, atol=1e-6)
        expected = sum(w * t[name] for t, w in updates)
        torch.testing.assert_close(whole.get(name), expected, rtol=1e-6, atol=1e-6)
    assert chunked.weight_sum == whole.weight_sum == 3.75 and chunked.count == 3


def test_pop_releases_and_untouched_tensors_are_zero() -> None:
    acc = Accumulator({"a": (2, 2), "b": (4,)})
    acc.fold("a", 2, torch.tensor([1.0, 2.0]), 3.0)
    assert acc.pop("a").tolist() == [[0.0, 0.0], [3.0, 6.0]]
    assert "a" not in acc.sums
    assert acc.pop("b").tolist() == [0.0] * 4


def test_out_of_range_slice_and_unknown_tensor_are_refused() -> None:
    acc = Accumulator({"a": (4,)})
    with pytest.raises(ValueError):
        acc.fold("a", 3, torch.ones(2), 1.0)
    with pytest.raises(KeyError):
        acc.fold("zz", 0, torch.ones(1), 1.0)


def test_window_is_zeroed_and_reuses_its_buffer() -> None:
    acc = Accumulator({})
    w = acc.window(8)
    w.add_(torch.ones(8), alpha=2.0)
    again = acc.window(5)
    assert again.tolist() == [0.0] * 5
    assert again.data_ptr() == w.data_ptr()  # no fresh memory per window
    assert acc.window(16).tolist() == [0.0] * 16

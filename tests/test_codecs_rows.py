"""Batched decode and check of small chunks (``Codec.decode_add_rows``, ``check_rows``, ``wire.add_tensors``,
``wire.check_chunks``): the same sums bit for bit and the same verdicts as one chunk at a time."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fedq import wire
from fedq.codecs import get_codec
from fedq.errors import WireError
from tests.test_codecs import CONFIGS, CPU, KINDS, SETTINGS, _values
from tests.test_codecs_norm import _poke_scales, poked_chunk

BATCHED = ["fp32", "nf4", "fp4"]


def _chunks(name: str, k: int, n: int, kind: str, seed: int) -> list[tuple[dict[str, Any], Any]]:
    codec = get_codec(name)
    return [codec.encode(_values(seed + i, n, kind, 0.01 * (i + 1))) for i in range(k)]


def _one_by_one(
    name: str, chunks: list[tuple[dict[str, Any], Any]], n: int, alphas: list[float]
) -> torch.Tensor:
    codec = get_codec(name)
    out = _values(7, n, "normal", 0.02)
    for (meta, payload), alpha in zip(chunks, alphas, strict=True):
        codec.decode_add(meta, payload, n, out, alpha)
    return out


@SETTINGS
@given(
    name=st.sampled_from(BATCHED),
    k=st.integers(1, 12),
    n=st.one_of(st.integers(1, 3000), st.sampled_from([160, 10240, 102400, 64 * 256 + 1])),
    kind=st.sampled_from(KINDS),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_decode_add_rows_is_decode_add_in_turn_bit_for_bit(
    name: str, k: int, n: int, kind: str, seed: int, data: st.DataObject
) -> None:
    alphas = data.draw(st.lists(st.floats(-4.0, 4.0), min_size=k, max_size=k))
    chunks = _chunks(name, k, n, kind, seed)
    out = _values(7, n, "normal", 0.02)
    assert get_codec(name).decode_add_rows(chunks, n, out, alphas)
    want = _one_by_one(name, chunks, n, alphas)
    assert torch.equal(out.view(torch.int32), want.view(torch.int32))


@pytest.mark.parametrize("name", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -1.0, 3e38])
def test_a_bad_chunk_makes_decode_add_rows_decline_with_out_untouched(name: str, value: float) -> None:
    """The caller then adds chunk by chunk, and ``decode_add`` refuses the one at fault as it always did."""
    codec = get_codec(name)
    n = 5000
    chunks = _chunks(name, 3, n, "normal", 1)
    meta, raw = chunks[1]
    chunks[1] = (meta, _poke_scales(codec, raw, n, value, both=True))
    out = torch.zeros(n)
    assert not codec.decode_add_rows(chunks, n, out, [1.0, 1.0, 1.0])
    assert bool((out == 0).all())


def test_fp32_rows_with_nan_decline_and_large_chunks_are_not_batched() -> None:
    fp32 = get_codec("fp32")
    bad = torch.ones(160)
    bad[3] = math.nan
    chunks = [fp32.encode(torch.ones(160)), ({}, bad.numpy().tobytes())]
    assert not fp32.decode_add_rows(chunks, 160, torch.zeros(160), [1.0, 1.0])
    big = (1 << 18) + 64
    nf4 = get_codec("nf4")
    assert not nf4.decode_add_rows(_chunks("nf4", 2, big, "normal", 0), big, torch.zeros(big), [1.0, 1.0])
    assert not nf4.decode_add_rows(_chunks("nf4", 2, 0, "normal", 0), 0, torch.zeros(0), [1.0, 1.0])  # empty


def _message(name: str, values: torch.Tensor, index: int, raw: bytes | None = None) -> wire.Message:
    codec = get_codec(name)
    meta, payload = codec.encode(values)
    body = wire.frame_chunk(
        stream="s",
        index=index,
        name="w",
        dtype=torch.float32,
        shape=(values.numel(),),
        offset=0,
        count=values.numel(),
        codec=codec,
        codec_meta=meta,
        raw=raw if raw is not None else bytes(payload),
    )
    return wire.decode(body)


def _verdicts(msgs: list[wire.Message], check: Any) -> list[tuple[str, str] | None]:
    out: list[tuple[str, str] | None] = []
    for msg in msgs:
        try:
            check(msg)
            out.append(None)
        except WireError as exc:
            out.append((exc.reason, str(exc)))
    return out


@pytest.mark.parametrize(
    ("name", "value", "both"),
    [("nf4", math.nan, False), ("nf4", 3e38, True), ("nf4", 2.0**126, True), ("int8", math.nan, False)],
)
def test_check_chunks_gives_each_chunk_check_chunks_verdict(name: str, value: float, both: bool) -> None:
    """A delivery's chunks, checked together: good ones pass, a bad one gets exactly its own error."""
    nan = torch.ones(160)
    nan[0] = math.nan
    msgs = [
        _message("nf4", _values(1, 10240, "normal", 0.01), 0),
        _message("fp32", torch.ones(160), 1),
        poked_chunk(name, value, both, 5000),
        _message("fp32", nan, 3, raw=nan.numpy().tobytes()),
        _message("nf4", _values(2, 25600, "spike", 1.0), 4),
        _message("fp4", _values(3, 640, "mixed", 1.0), 5),
    ]
    got = [(e.reason, str(e)) if e is not None else None for e in wire.check_chunks(msgs)]
    assert got == _verdicts(msgs, wire.check_chunk)
    assert got[0] is None and got[1] is None and got[3] is not None and got[3][0] == "nonfinite"


@pytest.mark.parametrize("config", CONFIGS)
def test_add_tensors_equals_add_tensor_in_turn(config: tuple[str, dict[str, Any]]) -> None:
    codec = get_codec(config[0], **config[1])
    n = 4160
    msgs = []
    for i in range(5):
        meta, payload = codec.encode(_values(i, n, "mixed", 0.01))
        body = wire.frame_chunk(
            stream="s",
            index=i,
            name="w",
            dtype=torch.float32,
            shape=(n,),
            offset=0,
            count=n,
            codec=codec,
            codec_meta=meta,
            raw=bytes(payload),
        )
        msgs.append(wire.decode(body))
    alphas = [0.5, -1.25, 2.0, 0.1, 1.0]
    got, want = torch.zeros(n), torch.zeros(n)
    wire.add_tensors(msgs, got, alphas)
    for msg, alpha in zip(msgs, alphas, strict=True):
        wire.add_tensor(msg, want, alpha)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_add_tensors_refuses_a_bad_chunk_with_add_tensors_error() -> None:
    msgs = [poked_chunk("nf4", 1e-3, False), poked_chunk("nf4", 3e38, True)]
    with pytest.raises(WireError) as batched:
        wire.add_tensors(msgs, torch.zeros(5000), [1.0, 1.0])
    with pytest.raises(WireError) as single:
        wire.add_tensor(msgs[1], torch.zeros(5000), 1.0)
    assert (batched.value.reason, str(batched.value)) == (single.value.reason, str(single.value))


def test_check_rows_on_the_cpu_only() -> None:
    """A GPU check stays one chunk at a time (its deferred checks are read by the fold's owner)."""
    nf4 = get_codec("nf4")
    meta, payload = nf4.encode(torch.ones(640))
    assert nf4.check_rows([(meta, payload, 640)], CPU)
    assert not nf4.check_rows([(meta, payload, 640)], torch.device("meta"))

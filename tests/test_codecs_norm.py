"""``Codec.sq_norm``: Σ x² of the decoded values, from the payload (no full decode for block codecs)."""

from __future__ import annotations

import math
import struct
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fedq import wire
from fedq.codecs import Codec, get_codec
from fedq.errors import CodecError, WireError
from tests.test_codecs import CONFIGS, CPU, KINDS, SETTINGS, _values

REL = 1e-6  # float32 sums of squared codes per block; everything else is float64


def _reference(codec: Codec, meta: dict[str, Any], payload: Any, n: int) -> float:
    return float(codec.decode(meta, payload, n, CPU).double().pow(2).sum())


def _close(got: float, want: float) -> bool:
    if not math.isfinite(want):
        return not math.isfinite(got)
    return math.isfinite(got) and abs(got - want) <= REL * want + 1e-300


@SETTINGS
@given(
    config=st.sampled_from(CONFIGS),
    n=st.one_of(
        st.integers(0, 3), st.integers(0, 3000), st.sampled_from([15, 17, 63, 65, 4095, 4097, 16385])
    ),
    kind=st.sampled_from(KINDS),
    exponent=st.integers(-30, 30),
    seed=st.integers(0, 2**31 - 1),
)
def test_sq_norm_equals_sum_of_squares_of_decode(
    config: tuple[str, dict[str, Any]], n: int, kind: str, exponent: int, seed: int
) -> None:
    codec = get_codec(config[0], **config[1])
    meta, payload = codec.encode(_values(seed, n, kind, 10.0**exponent))
    got, want = codec.sq_norm(meta, payload, n), _reference(codec, meta, payload, n)
    assert _close(got, want), (codec, n, got, want)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("n", [1, 2, 3, 16 * 256 + 1, 3 * (1 << 20) + 5])
def test_sq_norm_on_odd_sizes_and_several_steps(config: tuple[str, dict[str, Any]], n: int) -> None:
    codec = get_codec(config[0], **config[1])
    meta, payload = codec.encode(_values(n, n, "mixed", 0.02))
    got, want = codec.sq_norm(meta, payload, n), _reference(codec, meta, payload, n)
    assert _close(got, want), (codec, n, got, want)


@pytest.mark.parametrize("name", ["nf4", "fp4"])
def test_four_bit_ignores_the_padding_nibble_of_an_odd_count(name: str) -> None:
    codec = get_codec(name)
    n = 101
    meta, raw = codec.encode(_values(1, n, "normal", 1.0))
    data = bytearray(memoryview(raw).cast("B"))
    data[-1] |= 0x0F  # the low nibble of the last byte is past the end: decode never reads it
    assert _close(codec.sq_norm(meta, bytes(data), n), _reference(codec, meta, bytes(data), n))


@SETTINGS
@given(config=st.sampled_from(CONFIGS), count=st.integers(0, 700), data=st.data())
def test_sq_norm_of_garbage_agrees_with_decode(
    config: tuple[str, dict[str, Any]], count: int, data: st.DataObject
) -> None:
    """Untrusted bytes: sq_norm and check refuse exactly what decode refuses; sq_norm is non-finite, and
    check refuses, exactly when the decoded values are non-finite."""
    codec = get_codec(config[0], **config[1])
    payload = data.draw(st.binary(min_size=codec.payload_nbytes(count), max_size=codec.payload_nbytes(count)))
    meta = {"scale": data.draw(st.floats(allow_nan=True))} if codec.name == "fp16" else {}
    try:
        want = _reference(codec, meta, payload, count)
    except CodecError:
        for f in (codec.sq_norm, codec.check):
            with pytest.raises(CodecError):
                f(meta, payload, count)
        return
    assert _close(codec.sq_norm(meta, payload, count), want)
    if math.isfinite(want):
        codec.check(meta, payload, count)
    else:
        with pytest.raises(CodecError) as info:
            codec.check(meta, payload, count)
        assert info.value.reason == "nonfinite"


def _poke_scales(codec: Codec, raw: Any, n: int, value: float, both: bool = False) -> bytes:
    """The payload with ``value`` as the first block scale (int8: absmax; 4-bit: group step, and minimum)."""
    data = bytearray(memoryview(raw).cast("B"))
    data[0:4] = struct.pack("<f", value)
    if both:
        nblocks = -(-n // codec.config()["block"])
        ngroups = -(-nblocks // 256)
        data[4 * ngroups : 4 * ngroups + 4] = struct.pack("<f", value)
    return bytes(data)


def poked_chunk(name: str, value: float, both: bool, n: int = 5000) -> wire.Message:
    """A valid chunk message (correct CRC) of ``n`` elements whose first block scale is ``value``."""
    codec = get_codec(name)
    meta, raw = codec.encode(_values(4, n, "normal", 1.0))
    body = wire.frame_chunk(
        stream="s",
        index=0,
        name="w",
        dtype=torch.float32,
        shape=(n,),
        offset=0,
        count=n,
        codec=codec,
        codec_meta=meta,
        raw=_poke_scales(codec, raw, n, value, both),
    )
    return wire.decode(body)


@pytest.mark.parametrize("config", [c for c in CONFIGS if c[0] in ("int8", "nf4", "fp4")])
@pytest.mark.parametrize("value", [math.nan, math.inf, -1.0])
def test_nan_inf_or_negative_scales_are_refused(config: tuple[str, dict[str, Any]], value: float) -> None:
    codec = get_codec(config[0], **config[1])
    n = 5000
    meta, raw = codec.encode(_values(2, n, "normal", 1.0))
    bad = _poke_scales(codec, raw, n, value)
    with pytest.raises(CodecError):
        codec.decode(meta, bad, n, CPU)
    for f in (codec.sq_norm, codec.check):
        with pytest.raises(CodecError):
            f(meta, bad, n)


@pytest.mark.parametrize("config", [c for c in CONFIGS if c[0] in ("int8", "nf4", "fp4")])
def test_overflowing_scales_give_a_non_finite_norm(config: tuple[str, dict[str, Any]]) -> None:
    """Finite scales whose decoded values overflow fp32 (int8: code -128 times absmax/127 near the fp32
    maximum; 4-bit: group minimum + code * step) must not pass as a finite norm."""
    codec = get_codec(config[0], **config[1])
    n = 5000
    meta, raw = codec.encode(_values(3, n, "normal", 1.0))
    data = bytearray(_poke_scales(codec, raw, n, 3.4e38, both=codec.name != "int8"))
    if codec.name == "int8":
        nblocks = -(-n // codec.config()["block"])
        data[4 * nblocks] = 0x80  # the first element's code is -128
    assert not math.isfinite(_reference(codec, meta, bytes(data), n))
    assert not math.isfinite(codec.sq_norm(meta, bytes(data), n))
    with pytest.raises(CodecError) as info:
        codec.check(meta, bytes(data), n)
    assert info.value.reason == "nonfinite"


@pytest.mark.parametrize(
    ("name", "value", "both", "reason"),
    [("int8", math.nan, False, "codec"), ("nf4", math.nan, False, "codec"), ("nf4", 3e38, True, "nonfinite")],
)
def test_chunk_sq_norm_reasons_match_decode_tensor(name: str, value: float, both: bool, reason: str) -> None:
    msg = poked_chunk(name, value, both)
    for f in (wire.decode_tensor, wire.chunk_sq_norm, wire.check_chunk):
        with pytest.raises(WireError) as info:
            f(msg)
        assert info.value.reason == reason


@pytest.mark.parametrize("name", ["nf4", "fp4"])
@pytest.mark.parametrize(("code", "finite"), [(0, True), (255, False)])
def test_a_check_near_the_float32_maximum_follows_the_codes_actually_used(
    name: str, code: int, finite: bool
) -> None:
    """check's quick bound (group minimum + 255 steps) overflows here; the scales the codes give decide."""
    codec = get_codec(name)
    n = 64 * 256
    meta, raw = codec.encode(_values(3, n, "normal", 1.0))
    data = bytearray(memoryview(raw).cast("B"))
    data[0:8] = struct.pack("<ff", 1e37, 3e38)  # the one group's step and minimum: 3e38 + 255e37 overflows
    data[8 : 8 + 256] = bytes([code]) * 256  # every block's scale code
    assert math.isfinite(_reference(codec, meta, bytes(data), n)) == finite
    if finite:
        codec.check(meta, bytes(data), n)
    else:
        with pytest.raises(CodecError):
            codec.check(meta, bytes(data), n)

"""``Codec.decode_add``: out += alpha * decode(...), without the decoded copy, refusing before it writes."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fedq import wire
from fedq.codecs import get_codec
from fedq.errors import CodecError, WireError
from tests.test_codecs import CONFIGS, CPU, KINDS, SETTINGS, _values
from tests.test_codecs_norm import _poke_scales, poked_chunk


def _assert_added(got: torch.Tensor, base: torch.Tensor, alpha: float, decoded: torch.Tensor) -> None:
    """Equal to base + alpha * decoded up to float32 rounding of the product and the sum."""
    want = base.double() + alpha * decoded.double()
    bound = 4e-7 * (base.double().abs() + abs(alpha) * decoded.double().abs()) + 1e-37
    assert bool(((got.double() - want).abs() <= bound).all())


@SETTINGS
@given(
    config=st.sampled_from(CONFIGS),
    n=st.one_of(st.integers(0, 3000), st.sampled_from([15, 17, 63, 65, 4095, 4097, 16385])),
    kind=st.sampled_from(KINDS),
    exponent=st.integers(-20, 20),
    alpha=st.floats(-4.0, 4.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_decode_add_equals_adding_the_decoded_values(
    config: tuple[str, dict[str, Any]], n: int, kind: str, exponent: int, alpha: float, seed: int
) -> None:
    codec = get_codec(config[0], **config[1])
    meta, payload = codec.encode(_values(seed, n, kind, 10.0**exponent))
    base = _values(seed + 1, n, "normal", 10.0**exponent)
    out = base.clone()
    codec.decode_add(meta, payload, n, out, alpha)
    _assert_added(out, base, alpha, codec.decode(meta, payload, n, CPU))


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("n", [1, 3, 16 * 256 + 1, 3 * (1 << 20) + 5])
def test_decode_add_over_several_steps_and_odd_sizes(config: tuple[str, dict[str, Any]], n: int) -> None:
    codec = get_codec(config[0], **config[1])
    meta, payload = codec.encode(_values(n, n, "mixed", 0.02))
    base = _values(n + 1, n, "normal", 0.02)
    out = base.clone()
    codec.decode_add(meta, payload, n, out, -0.75)
    _assert_added(out, base, -0.75, codec.decode(meta, payload, n, CPU))


@SETTINGS
@given(config=st.sampled_from(CONFIGS), count=st.integers(0, 700), data=st.data())
def test_decode_add_of_garbage_refuses_what_decode_tensor_refuses(
    config: tuple[str, dict[str, Any]], count: int, data: st.DataObject
) -> None:
    """Untrusted bytes: refused exactly when decode refuses them or decodes them to NaN/Inf, and then
    ``out`` is left as it was."""
    codec = get_codec(config[0], **config[1])
    payload = data.draw(st.binary(min_size=codec.payload_nbytes(count), max_size=codec.payload_nbytes(count)))
    meta = {"scale": data.draw(st.floats(allow_nan=True))} if codec.name == "fp16" else {}
    out = torch.ones(count)
    try:
        decoded = codec.decode(meta, payload, count, CPU)
        refused = not bool(torch.isfinite(decoded).all())
    except CodecError:
        refused = True
    if refused:
        with pytest.raises(CodecError):
            codec.decode_add(meta, payload, count, out, 0.5)
        assert bool((out == 1).all())
    else:
        codec.decode_add(meta, payload, count, out, 0.5)
        _assert_added(out, torch.ones(count), 0.5, decoded)


@pytest.mark.parametrize("out", [torch.zeros(9), torch.zeros(10, dtype=torch.float64), torch.zeros(2, 5)])
def test_decode_add_needs_a_float32_vector_of_the_count(out: torch.Tensor) -> None:
    codec = get_codec("nf4")
    meta, payload = codec.encode(torch.ones(10))
    with pytest.raises(CodecError, match="float32 tensor of shape"):
        codec.decode_add(meta, payload, 10, out, 1.0)


@pytest.mark.parametrize(
    ("name", "value", "both", "reason"),
    [
        ("int8", math.nan, False, "codec"),
        ("nf4", math.nan, False, "codec"),
        ("nf4", 3e38, True, "nonfinite"),
        ("fp4", 3e38, True, "nonfinite"),
    ],
)
def test_add_tensor_reasons_match_decode_tensor(name: str, value: float, both: bool, reason: str) -> None:
    n = 5000
    msg = poked_chunk(name, value, both, n)
    with pytest.raises(WireError) as decoded:
        wire.decode_tensor(msg)
    out = torch.zeros(n)
    with pytest.raises(WireError) as added:
        wire.add_tensor(msg, out, 1.0)
    assert added.value.reason == decoded.value.reason == reason
    assert bool((out == 0).all())


def test_int8_code_minus_128_near_the_float_maximum_is_refused_as_nonfinite() -> None:
    codec = get_codec("int8")
    n = 5000
    meta, raw = codec.encode(_values(3, n, "normal", 1.0))
    data = bytearray(_poke_scales(codec, raw, n, 3.4e38))
    data[4 * -(-n // codec.config()["block"])] = 0x80  # the first element's code is -128: -128/127 * 3.4e38
    out = torch.zeros(n)
    with pytest.raises(CodecError) as info:
        codec.decode_add(meta, bytes(data), n, out, 1.0)
    assert info.value.reason == "nonfinite"
    assert bool((out == 0).all())

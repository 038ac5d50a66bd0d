"""Codecs: round trips within each codec's derived error bound, exact sizes, chunking, hostile input."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedq.codecs import CODECS, Codec, choose_codec, codec_from_header, get_codec
from fedq.codecs.blockwise import GROUP, SHRINK, FourBit, Int8, max_error_factor
from fedq.codecs.floats import Fp16
from fedq.errors import CodecError

CPU = torch.device("cpu")
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# (name, params) of every codec configuration under test: defaults plus the smallest and other block sizes
CONFIGS = [
    ("fp32", {}),
    ("fp16", {}),
    ("bf16", {}),
    ("int8", {}),
    ("int8", {"block": 64}),
    ("nf4", {}),
    ("nf4", {"block": 16}),
    ("fp4", {}),
    ("fp4", {"block": 128}),
]
KINDS = ["normal", "zeros", "spike", "constant", "sparse", "mixed"]


def _values(seed: int, n: int, kind: str, scale: float) -> torch.Tensor:
    """Test data in float32: weight-like, degenerate, and blocks of very different magnitude."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator=g, dtype=torch.float64)
    if kind == "zeros":
        z.zero_()
    elif kind == "spike":
        z = torch.zeros(n, dtype=torch.float64)
        if n:
            z[seed % n] = -3.0
    elif kind == "constant":
        z.fill_(1.0)
    elif kind == "sparse":
        z *= torch.rand(n, generator=g, dtype=torch.float64) < 0.1
    elif kind == "mixed":  # magnitudes spread over six decades, so a group's block maxima differ widely
        z *= 10.0 ** torch.empty(n, dtype=torch.float64).uniform_(-3, 3, generator=g)
    return (z * scale).to(torch.float32)


def _per_element(values_per_block: torch.Tensor, block: int, n: int) -> torch.Tensor:
    return values_per_block.repeat_interleave(block)[:n]


def _block_absmax(x: torch.Tensor, block: int) -> torch.Tensor:
    pad = -x.numel() % block
    return torch.nn.functional.pad(x.abs(), (0, pad)).view(-1, block).amax(dim=1)


def _bound(codec: Codec, x: torch.Tensor, meta: dict[str, Any]) -> torch.Tensor:
    """Per-element error bound, derived from each codec's construction (see the codec docstrings)."""
    n = x.numel()
    if codec.name == "fp32":
        return torch.zeros(n)
    if codec.name == "bf16":  # round to nearest with 8 significant bits; subnormal spacing 2**-133
        return x.abs() * 2.0**-8 + 2.0**-133
    if codec.name == "fp16":  # 11 significant bits in the normal range; subnormal spacing 2**-24 of the scale
        return x.abs() * (2.0**-11 + 2.0**-20) + meta["scale"] * 2.0**-24
    if isinstance(codec, Int8):  # half a step of absmax/127, plus fp32 rounding of x*127/a and q*a/127
        a = _per_element(_block_absmax(x, codec.block), codec.block, n)
        return a / 254 + a * 2.0**-20 + 2.0**-110
    assert isinstance(codec, FourBit)
    block_a = _block_absmax(x, codec.block)
    target = block_a * SHRINK
    pad = -target.numel() % GROUP
    rows = torch.cat([target, target[-1:].expand(pad)]).view(-1, GROUP)
    step = ((rows.amax(dim=1) - rows.amin(dim=1)) / 255).repeat_interleave(GROUP)[: target.numel()]
    a = _per_element(block_a, codec.block, n)
    t = _per_element(target, codec.block, n)
    s = _per_element(step, codec.block, n)
    f = max_error_factor(codec.levels)
    return f * (t + s / 2) + (a - t) + s / 2 + a * 2.0**-18 + 2.0**-110


@SETTINGS
@given(
    config=st.sampled_from(CONFIGS),
    n=st.one_of(st.integers(0, 3), st.integers(0, 3000), st.sampled_from([64, 4095, 4096, 4097, 16384 + 1])),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    kind=st.sampled_from(KINDS),
    exponent=st.integers(-30, 30),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_within_bound_and_exact_size(
    config: tuple[str, dict[str, Any]], n: int, dtype: torch.dtype, kind: str, exponent: int, seed: int
) -> None:
    if dtype == torch.float16:
        exponent = max(-3, min(exponent, 0))  # keep the input itself finite in fp16 ("mixed" spans 6 decades)
    codec = get_codec(config[0], **config[1])
    x = _values(seed, n, kind, 10.0**exponent).to(dtype)
    meta, payload = codec.encode(x)
    assert memoryview(payload).nbytes == codec.payload_nbytes(n)
    y = codec.decode(meta, payload, n, CPU)
    assert y.dtype == torch.float32 and y.shape == (n,)
    x32 = x.to(torch.float32)
    err = (y - x32).abs()
    bound = _bound(codec, x32, meta)
    assert bool((err <= bound).all()), f"max excess {float((err - bound).max())} for {codec}"


@pytest.mark.parametrize("config", CONFIGS)
def test_zero_dim_and_empty_tensors(config: tuple[str, dict[str, Any]]) -> None:
    codec = get_codec(config[0], **config[1])
    one = torch.tensor(0.37).reshape(-1)  # the wire layer flattens a 0-d tensor to one element
    meta, payload = codec.encode(one)
    assert codec.decode(meta, payload, 1, CPU).item() == pytest.approx(0.37, rel=0.2)
    meta, payload = codec.encode(torch.empty(0))
    assert memoryview(payload).nbytes == codec.payload_nbytes(0) == 0
    assert codec.decode(meta, payload, 0, CPU).shape == (0,)


@given(n=st.integers(0, 10**10), block=st.sampled_from([64, 256, 4096, 1 << 20]))
def test_int8_payload_size_formula(n: int, block: int) -> None:
    assert Int8(block).payload_nbytes(n) == n + 4 * math.ceil(n / block)


@given(n=st.integers(0, 10**10), name=st.sampled_from(["nf4", "fp4"]), block=st.sampled_from([16, 64, 4096]))
def test_four_bit_payload_size_formula(n: int, name: str, block: int) -> None:
    blocks = math.ceil(n / block)
    expected = math.ceil(n / 2) + blocks + 8 * math.ceil(blocks / 256)
    assert get_codec(name, block=block).payload_nbytes(n) == expected


@pytest.mark.parametrize("n", [1 << 20, 1 << 24, 128256 * 2048, 2048 * 8192])
def test_nf4_costs_at_most_4_13_bits_per_parameter(n: int) -> None:
    assert get_codec("nf4").payload_nbytes(n) * 8 / n <= 4.13


def test_metadata_share_of_the_defaults() -> None:
    """All metadata included: int8 25.024% of fp32 (1 + 4/4096 bytes), nf4 12.90% (4.1289 bits)."""
    n = 1 << 24
    assert get_codec("int8").payload_nbytes(n) / (4 * n) == pytest.approx(0.250244, abs=1e-6)
    assert get_codec("nf4").payload_nbytes(n) * 8 / n == pytest.approx(4 + 8 / 64 + 64 / (64 * 256), abs=1e-9)


@settings(max_examples=25, deadline=None)
@given(
    config=st.sampled_from([c for c in CONFIGS if c[0] not in ("fp16",)]),
    units=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    tail=st.integers(0, 1000),
    seed=st.integers(0, 2**31 - 1),
)
def test_chunked_encode_equals_whole(
    config: tuple[str, dict[str, Any]], units: list[int], tail: int, seed: int
) -> None:
    """Chunks of whole alignment units decode to exactly the whole tensor's decode, at the same total size."""
    codec = get_codec(config[0], **config[1])
    sizes = [u * codec.alignment for u in units] + [tail]
    x = _values(seed, sum(sizes), "mixed", 0.02)
    meta, payload = codec.encode(x)
    whole = codec.decode(meta, payload, x.numel(), CPU)
    parts, nbytes, lo = [], 0, 0
    for size in sizes:
        m, p = codec.encode(x[lo : lo + size])
        parts.append(codec.decode(m, p, size, CPU))
        nbytes += memoryview(p).nbytes
        lo += size
    assert torch.equal(torch.cat(parts), whole)
    assert nbytes == memoryview(payload).nbytes


@settings(max_examples=40, deadline=None)
@given(
    config=st.sampled_from(CONFIGS),
    n=st.one_of(st.integers(0, 3000), st.sampled_from([16384, 16384 * 2 + 7, 3 * 16384])),
    data=st.data(),
    seed=st.integers(0, 2**31 - 1),
)
def test_decode_part_equals_the_slice_of_the_whole_decode(
    config: tuple[str, dict[str, Any]], n: int, data: st.DataObject, seed: int
) -> None:
    """Any part, aligned or not, decodes to exactly the same values as the whole chunk's decode."""
    codec = get_codec(config[0], **config[1])
    x = _values(seed, n, "mixed", 0.02)
    meta, payload = codec.encode(x)
    whole = codec.decode(meta, payload, n, CPU)
    lo = data.draw(st.integers(0, n))
    hi = data.draw(st.integers(lo, n))
    assert torch.equal(codec.decode_part(meta, payload, n, lo, hi, CPU), whole[lo:hi])
    with pytest.raises(CodecError):
        codec.decode_part(meta, payload, n, lo, n + 1, CPU)


@pytest.mark.parametrize(
    ("name", "params", "golden"),
    [
        # absmax 1.0 | codes round(x * 127)
        ("int8", {"block": 64}, "0000803f007f8140e00d005926"),
        # group step 0.0 | group min 0.97 | scale code 0 | nibbles 7 f, 0 d, 4 8, 7 e, b (7 = NF4's zero)
        ("nf4", {}, "00000000ec51783f007f0d487eb7"),
        # the same scales | E2M1 nibbles: sign bit 3, magnitude index bits 0-2
        ("fp4", {}, "00000000ec51783f0007f5b10640"),
    ],
)
def test_payload_format_is_stable(name: str, params: dict[str, Any], golden: str) -> None:
    """Golden payloads: a change of layout, nibble order, levels or scale rule breaks compatibility."""
    x = torch.tensor([0.0, 1.0, -1.0, 0.5, -0.25, 0.1, 0.0, 0.7, 0.3])
    assert bytes(get_codec(name, **params).encode(x)[1]).hex() == golden


def test_alignment_covers_whole_groups() -> None:
    assert get_codec("nf4").alignment == 64 * 256
    assert get_codec("fp4", block=128).alignment == 128 * 256
    assert get_codec("int8").alignment == 4096
    assert get_codec("fp16").alignment == get_codec("fp32").alignment == 1


@pytest.mark.parametrize(
    ("name", "limit", "expected"),
    [("int8", 0.0132, 0.0087), ("nf4", 0.0919, 0.0913), ("fp4", 0.122, 0.1050), ("bf16", 2e-3, 1.7e-3)],
)
def test_rel_l2_on_weight_like_values(name: str, limit: float, expected: float) -> None:
    """Targets of issue 2 (bitsandbytes at the same block size: int8 0.0132, nf4 0.0919, fp4 0.122)."""
    x = torch.randn(1 << 20, generator=torch.Generator().manual_seed(0)) * 0.02
    codec = get_codec(name)
    meta, payload = codec.encode(x)
    rel = float((codec.decode(meta, payload, x.numel(), CPU) - x).norm() / x.norm())
    assert rel <= limit
    assert rel == pytest.approx(expected, rel=0.03)


def test_fp16_scale_keeps_small_deltas_out_of_subnormals() -> None:
    delta = torch.randn(1 << 16, generator=torch.Generator().manual_seed(1)) * 5e-6
    plain = delta.to(torch.float16)
    subnormal = float((plain.abs() < 2.0**-14).float().mean())
    plain_rel = float((plain.float() - delta).norm() / delta.norm())
    meta, payload = Fp16().encode(delta)
    rel = float((Fp16().decode(meta, payload, delta.numel(), CPU) - delta).norm() / delta.norm())
    assert subnormal > 0.99 and plain_rel > 3e-3
    assert rel < 3.5e-4  # fp16's own 2**-11 relative rounding, nothing more
    assert meta["scale"] == pytest.approx(float(delta.abs().max()) / 2**14)


@pytest.mark.parametrize("name", ["fp16", "int8", "nf4", "fp4"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_encode_refuses_non_finite_values(name: str, bad: float) -> None:
    x = torch.zeros(5000)
    x[4500] = bad
    with pytest.raises(CodecError):
        get_codec(name).encode(x)


@pytest.mark.parametrize("name", sorted(CODECS))
@pytest.mark.parametrize(
    "x", [torch.zeros(4, 4), torch.zeros(4, dtype=torch.int32), torch.zeros(3, dtype=torch.float64)]
)
def test_encode_refuses_other_shapes_and_dtypes(name: str, x: torch.Tensor) -> None:
    with pytest.raises(CodecError):
        get_codec(name).encode(x)


@pytest.mark.parametrize("name", sorted(CODECS))
def test_encode_accepts_non_contiguous_and_grad_requiring_input(name: str) -> None:
    base = torch.randn(2 * 5000, generator=torch.Generator().manual_seed(2), requires_grad=True)
    x = base[::2]
    codec = get_codec(name)
    meta, payload = codec.encode(x)
    expected = codec.encode(x.detach().clone())
    assert meta == expected[0] and bytes(payload) == bytes(expected[1])


def test_decoded_tensor_does_not_alias_the_payload() -> None:
    x = torch.arange(3 << 20, dtype=torch.float32)  # large enough for the huge-page output path
    meta, payload = get_codec("fp32").encode(x)
    frozen = bytes(payload)
    y = get_codec("fp32").decode(meta, frozen, x.numel(), CPU)
    y.add_(1.0)
    assert torch.equal(torch.frombuffer(bytearray(frozen), dtype=torch.float32), x)
    assert torch.equal(y, x + 1)


# ---------------------------------------------------------------------------------------------- hostile input

JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=5),
    st.binary(max_size=5),
    st.lists(st.integers(), max_size=2),
)


KEYS = st.one_of(st.sampled_from(["block", "group", "x"]), st.none(), st.integers(), st.text(max_size=5))


@given(
    name=st.one_of(st.sampled_from(sorted(CODECS)), JUNK),
    params=st.one_of(
        st.dictionaries(KEYS, st.one_of(st.sampled_from([16, 64, 4096]), JUNK), max_size=3), JUNK
    ),
)
def test_codec_from_header_accepts_valid_and_raises_codec_error_otherwise(name: Any, params: Any) -> None:
    try:
        codec = codec_from_header(name, params)
    except CodecError:
        return
    assert codec == get_codec(name, **params)
    assert codec.name == name and all(codec.config()[k] == v for k, v in params.items())


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("nf4", {"block": 63}),
        ("nf4", {"block": 8}),
        ("nf4", {"block": 8192}),
        ("nf4", {"block": True}),
        ("nf4", {"block": 64.0}),
        ("nf4", {"block": "64"}),
        ("int8", {"block": 2**40}),
        ("int8", {"block": -4096}),
        ("int8", {"block": 0}),
        ("int8", {"group": 256}),
        ("fp32", {"block": 64}),
        ("fp16", {"scale": 1.0}),
        ("nf8", {}),
        (None, {}),
        ("nf4", None),
        ("nf4", {1: 64}),
    ],
)
def test_codec_from_header_rejects(name: Any, params: Any) -> None:
    with pytest.raises(CodecError):
        codec_from_header(name, params)


@SETTINGS
@given(
    config=st.sampled_from(CONFIGS),
    payload=st.binary(max_size=600),
    count=st.one_of(st.integers(-3, 1200), st.sampled_from([2**62, 10**12]), JUNK),
    meta=st.one_of(st.fixed_dictionaries({}, optional={"scale": JUNK, "x": JUNK}), JUNK),
)
def test_decode_of_malformed_input_raises_codec_error_only(
    config: tuple[str, dict[str, Any]], payload: bytes, count: Any, meta: Any
) -> None:
    codec = get_codec(config[0], **config[1])
    try:
        y = codec.decode(meta, payload, count, CPU)
    except CodecError:
        return
    assert y.dtype == torch.float32 and y.shape == (count,)


@SETTINGS
@given(config=st.sampled_from(CONFIGS), count=st.integers(0, 700), data=st.data())
def test_decode_of_garbage_of_the_right_length_raises_codec_error_or_decodes(
    config: tuple[str, dict[str, Any]], count: int, data: st.DataObject
) -> None:
    """Scales decoded from untrusted bytes may be NaN, infinite or negative: those are refused."""
    codec = get_codec(config[0], **config[1])
    payload = data.draw(st.binary(min_size=codec.payload_nbytes(count), max_size=codec.payload_nbytes(count)))
    meta = {"scale": data.draw(st.floats(allow_nan=True))} if codec.name == "fp16" else {}
    try:
        y = codec.decode(meta, payload, count, CPU)
    except CodecError:
        return
    assert y.shape == (count,)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf"), 2.0**113, 1, "1", None])
def test_fp16_rejects_bad_scales(scale: Any) -> None:
    with pytest.raises(CodecError):
        Fp16().decode({"scale": scale}, b"\0\0", 1, CPU)


def test_truncated_payloads_are_refused_before_any_allocation() -> None:
    for name in CODECS:
        codec = get_codec(name)
        with pytest.raises(CodecError, match="does not match"):
            codec.decode({"scale": 1.0} if name == "fp16" else {}, b"\0" * 64, 2**62, CPU)


# ----------------------------------------------------------------------------------------------------- policy


@pytest.mark.parametrize(
    ("shape", "requested", "expected"),
    [
        ((2048,), "nf4", "fp32"),  # a norm gain
        ((), "int8", "fp32"),
        ((8, 500), "nf4", "nf4"),  # a LoRA matrix: small, but quantizing it saves bytes
        ((4, 32), "int8", "int8"),  # 128 + 4 bytes instead of 512
        ((1, 1), "nf4", "fp32"),  # block metadata would outweigh the values
        ((64, 64), "nf4", "nf4"),
        ((2048, 8192), "int8", "int8"),
        ((768,), "fp16", "fp16"),  # 16/32-bit codecs carry no metadata: kept whatever the size
        ((768,), "bf16", "bf16"),
    ],
)
def test_choose_codec(shape: tuple[int, ...], requested: str, expected: str) -> None:
    codec = choose_codec("model.layers.0.weight", shape, requested)
    assert codec.name == expected and codec == get_codec(expected)


def test_choose_codec_names_the_tensor_in_errors() -> None:
    with pytest.raises(CodecError, match="lm_head"):
        choose_codec("lm_head.weight", (10, 10), "int3")

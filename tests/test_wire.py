"""The wire format: golden vectors, round trips, and every malformed input raising WireError, nothing else."""

from __future__ import annotations

import contextlib
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedq import wire
from fedq.codecs import CODECS, get_codec
from fedq.errors import WireError

VECTORS = Path(__file__).parent / "vectors"


def _chunk(
    codec: str, x: torch.Tensor, *, index: int = 0, offset: int = 0, shape: Any = None, **kw: Any
) -> bytes:
    flat = x.reshape(-1)
    return wire.encode_chunk(
        stream=kw.get("stream", "golden"),
        index=index,
        name=kw.get("name", "layer.weight"),
        dtype=kw.get("dtype", x.dtype),
        shape=tuple(x.shape) if shape is None else shape,
        offset=offset,
        count=flat.numel(),
        codec=get_codec(codec),
        x=flat,
    )


def _exact(n: int) -> torch.Tensor:
    """Values exact in binary (no transcendental functions): quantizing them gives the same bytes anywhere."""
    return ((torch.arange(n) % 97 - 48) / 1024).reshape(-1, 4)


def _golden() -> dict[str, Callable[[], bytes]]:
    values = torch.arange(-6, 6, dtype=torch.float32) * 0.125
    sparse = torch.zeros(2048)
    sparse[::32] = 0.5
    return {
        "fp32_chunk.bin": lambda: _chunk("fp32", values.reshape(3, 4)),
        "fp16_chunk.bin": lambda: _chunk("fp16", values[4:].half(), index=1, offset=4, shape=(12,)),
        "lz4_chunk.bin": lambda: _chunk("fp32", sparse, index=2, name="frozen.weight"),
        "int8_chunk.bin": lambda: _chunk("int8", _exact(4096 + 100), index=3, name="q.weight"),
        "nf4_chunk.bin": lambda: _chunk("nf4", _exact(16384 + 100), index=4, name="q4.weight"),
        "manifest.bin": lambda: wire.encode_control(
            "manifest",
            "golden",
            {
                "tensors": [
                    ["layer.weight", "float32", [3, 4], "fp32", 1, 12],
                    ["layer.bias", "float16", [12], "fp16", 1, 12],
                    ["frozen.weight", "float32", [2048], "fp32", 1, 2048],
                ],
                "chunks": 3,
                "update_id": "u-0001",
                "client": "alice",
                "base_version": 7,
                "kind": "delta",
                "num_samples": 128,
                "metrics": {"loss": 1.5},
            },
        ),
        "commit.bin": lambda: wire.encode_control("commit", "golden", {"chunks": 3}),
        "batch.bin": lambda: wire.encode_batch(
            "golden",
            [
                wire.encode_control(
                    "manifest", "golden", {"tensors": [["w", "float32", [3, 4], "fp32", 1, 12]], "chunks": 1}
                ),
                _chunk("fp32", values.reshape(3, 4), name="w"),
                wire.encode_control("commit", "golden", {"chunks": 1}),
            ],
        ),
    }


@pytest.mark.parametrize("name", sorted(_golden()))
def test_golden_vectors_are_reproduced_byte_for_byte(name: str) -> None:
    """Regenerate with FEDQ_WRITE_VECTORS=1 only together with a new format version."""
    encoded = _golden()[name]()
    path = VECTORS / name
    if os.environ.get("FEDQ_WRITE_VECTORS") == "1":
        VECTORS.mkdir(exist_ok=True)
        path.write_bytes(encoded)
    assert encoded == path.read_bytes()


def test_golden_vectors_decode() -> None:
    values = torch.arange(-6, 6, dtype=torch.float32) * 0.125
    fp32 = wire.decode((VECTORS / "fp32_chunk.bin").read_bytes())
    assert (fp32.kind, fp32.stream, fp32.index, fp32.name, fp32.shape) == (
        "chunk",
        "golden",
        0,
        "layer.weight",
        (3, 4),
    )
    assert fp32.codec is not None and fp32.codec.name == "fp32"
    assert torch.equal(wire.decode_tensor(fp32), values)

    fp16 = wire.decode((VECTORS / "fp16_chunk.bin").read_bytes())
    assert (fp16.dtype, fp16.offset, fp16.count, fp16.index) == (torch.float16, 4, 8, 1)
    assert fp16.codec_meta["scale"] == pytest.approx(0.625 / 2**14)
    assert (wire.decode_tensor(fp16) - values[4:]).abs().max().item() < 2e-4  # fp16: 11 significant bits

    raw = (VECTORS / "lz4_chunk.bin").read_bytes()
    sparse = wire.decode(raw)
    assert len(raw) < 1000 and sparse.count == 2048
    expected = torch.zeros(2048)
    expected[::32] = 0.5
    assert torch.equal(wire.decode_tensor(sparse), expected)

    for name, codec, n in (("int8_chunk.bin", "int8", 4196), ("nf4_chunk.bin", "nf4", 16484)):
        msg = wire.decode((VECTORS / name).read_bytes())
        assert msg.codec == get_codec(codec) and (msg.count, msg.shape) == (n, (n // 4, 4))
        c = get_codec(codec)
        x = _exact(n).reshape(-1)
        assert torch.equal(wire.decode_tensor(msg), c.decode(*c.encode(x), n, torch.device("cpu")))

    manifest = wire.decode((VECTORS / "manifest.bin").read_bytes())
    assert (manifest.kind, manifest.meta["chunks"], manifest.meta["base_version"]) == ("manifest", 3, 7)
    assert manifest.meta["tensors"][1] == ["layer.bias", "float16", [12], "fp16", 1, 12]
    commit = wire.decode((VECTORS / "commit.bin").read_bytes())
    assert (commit.kind, commit.stream, commit.meta) == ("commit", "golden", {"chunks": 3})


def test_batch_vector_decodes_to_its_version_1_parts() -> None:
    """Version 2 adds the batch; its parts are version-1 messages, byte for byte as sent alone."""
    data = (VECTORS / "batch.bin").read_bytes()
    assert struct.unpack(">4sBBH", data[:8])[:3] == (b"FEDQ", 2, 0)
    parts = wire.decode_all(data)
    assert [m.kind for m, _ in parts] == ["manifest", "chunk", "commit"]
    assert all(bytes(p)[4] == 1 for _, p in parts)
    assert bytes(parts[1][1]) == _chunk(
        "fp32", torch.arange(-6, 6, dtype=torch.float32).reshape(3, 4) * 0.125, name="w"
    )
    assert torch.equal(wire.decode_tensor(parts[1][0]), torch.arange(-6, 6, dtype=torch.float32) * 0.125)
    single = (VECTORS / "commit.bin").read_bytes()
    assert [(m.kind, bytes(p)) for m, p in wire.decode_all(single)] == [("commit", single)]
    with pytest.raises(WireError) as info:
        wire.decode(data)  # a batch is not one message
    assert info.value.reason == "bad_kind"


def _batch_reason(header: dict[str, Any], payload: bytes, version: int = 2) -> str:
    with pytest.raises(WireError) as info:
        wire.decode_all(_frame(header, payload, version=version))
    return info.value.reason


def test_hostile_batches() -> None:
    commit = wire.encode_control("commit", "s", {"chunks": 1})
    other = wire.encode_control("commit", "t", {"chunks": 1})
    ok = {"kind": "batch", "stream": "s", "lens": [len(commit), len(commit)]}
    assert len(wire.decode_all(_frame(ok, commit + commit, version=2))) == 2
    assert _batch_reason(ok, commit + commit, version=1) == "version"
    assert _batch_reason({**ok, "lens": [len(commit), len(other)]}, commit + other) == "bad_header"
    assert _batch_reason({**ok, "lens": [len(commit)]}, commit + commit) == "length_mismatch"
    assert _batch_reason({**ok, "lens": [len(commit), len(commit) + 1]}, commit + commit) == "length_mismatch"
    assert _batch_reason({**ok, "lens": []}, b"") == "bad_header"
    assert _batch_reason({**ok, "lens": [-1, 2 * len(commit) + 1]}, commit + commit) == "bad_header"
    assert _batch_reason({**ok, "lens": [True]}, b"x") == "bad_header"
    assert _batch_reason({**ok, "extra": 1}, commit + commit) == "bad_header"
    assert _batch_reason({**ok, "lens": [4, len(commit) * 2 - 4]}, commit + commit) == "truncated"
    inner = wire.encode_batch("s", [commit])
    assert _batch_reason({**ok, "lens": [len(inner)]}, inner) == "bad_kind"  # no batch in a batch
    with pytest.raises(WireError) as info:
        wire.decode_all(_frame(ok, commit + commit, version=2), wire.Limits(max_batch_parts=1))
    assert info.value.reason == "bad_header"
    with pytest.raises(WireError):
        wire.encode_batch("s", [])


def test_preamble_layout() -> None:
    data = (VECTORS / "commit.bin").read_bytes()
    magic, version, flags, header_len = struct.unpack(">4sBBH", data[:8])
    assert (magic, version, flags, header_len) == (b"FEDQ", 1, 0, len(data) - 8)
    assert msgpack.unpackb(data[8:]) == {"kind": "commit", "stream": "golden", "meta": {"chunks": 3}}


@settings(max_examples=60, deadline=None)
@given(
    codec=st.sampled_from(sorted(CODECS)),
    shape=st.lists(st.integers(0, 9), min_size=0, max_size=3),
    scale=st.sampled_from([1e-5, 0.02, 3.0]),
    data=st.data(),
)
def test_round_trip_equals_the_codecs_own(
    codec: str, shape: list[int], scale: float, data: st.DataObject
) -> None:
    x = torch.randn(shape) * scale
    numel = x.numel()
    offset = data.draw(st.integers(0, numel))
    count = data.draw(st.integers(0, numel - offset))
    c = get_codec(codec)
    if c.alignment > 1:  # align the slice as the chunker does
        offset -= offset % c.alignment
        count = numel - offset
    piece = x.reshape(-1)[offset : offset + count]
    encoded = wire.encode_chunk(
        stream="s",
        index=3,
        name="t",
        dtype=x.dtype,
        shape=x.shape,
        offset=offset,
        count=count,
        codec=c,
        x=piece,
    )
    msg = wire.decode(encoded)
    assert (msg.offset, msg.count, msg.shape, msg.wire_bytes) == (offset, count, tuple(shape), len(encoded))
    meta, payload = c.encode(piece)
    assert torch.equal(wire.decode_tensor(msg), c.decode(meta, payload, count, torch.device("cpu")))


def _header_of(data: bytes) -> dict[str, Any]:
    header_len = struct.unpack(">H", data[6:8])[0]
    return msgpack.unpackb(data[8 : 8 + header_len])


def test_lz4_only_where_it_pays() -> None:
    dense = torch.randn(1 << 16) * 0.02
    for codec in sorted(CODECS):
        header = _header_of(_chunk(codec, dense))
        assert header["lz4"] is False and header["len"] == get_codec(codec).payload_nbytes(dense.numel())

    frozen = torch.zeros(1 << 16)
    frozen[::10] = torch.randn(frozen[::10].shape)
    encoded = _chunk("fp32", frozen)
    assert _header_of(encoded)["lz4"] is True
    assert len(encoded) < 0.35 * 4 * frozen.numel()
    assert torch.equal(wire.decode_tensor(wire.decode(encoded)), frozen)


# Malformed input --------------------------------------------------------------------------------------------


def _frame(
    header: Any, payload: bytes = b"", *, magic: bytes = b"FEDQ", version: int = 1, flags: int = 0
) -> bytes:
    packed = msgpack.packb(header, use_bin_type=True)
    return struct.pack(">4sBBH", magic, version, flags, len(packed)) + packed + payload


def _valid_header(payload: bytes, count: int = 4) -> dict[str, Any]:
    return {
        "kind": "chunk",
        "stream": "s",
        "index": 0,
        "name": "w",
        "dtype": "float32",
        "shape": [count],
        "offset": 0,
        "count": count,
        "codec": "fp32",
        "params": {},
        "meta": {},
        "lz4": False,
        "raw_len": len(payload),
        "len": len(payload),
        "crc32": zlib.crc32(payload),
    }


_PAYLOAD = struct.pack("<4f", 1.0, -2.0, 0.5, 0.25)


_LIMITS = wire.Limits()


def _reason(data: bytes, limits: wire.Limits = _LIMITS) -> str:
    with pytest.raises(WireError) as info:
        wire.decode_tensor(wire.decode(data, limits))
    return info.value.reason


def test_valid_hand_built_message_decodes() -> None:
    assert wire.decode_tensor(wire.decode(_frame(_valid_header(_PAYLOAD), _PAYLOAD))).tolist() == [
        1,
        -2,
        0.5,
        0.25,
    ]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"shape": [1 << 40, 1 << 40]}, "too_large"),
        ({"shape": [2] * 9}, "too_large"),
        ({"shape": [-4]}, "too_large"),
        ({"shape": [True]}, "too_large"),
        ({"shape": "4"}, "bad_header"),
        ({"count": 1 << 30, "shape": [1 << 30]}, "too_large"),
        ({"offset": 1}, "length_mismatch"),
        ({"count": 5}, "length_mismatch"),
        ({"raw_len": 20, "len": 20}, "length_mismatch"),
        ({"len": 15}, "length_mismatch"),
        ({"raw_len": 1 << 40}, "too_large"),
        ({"lz4": True}, "length_mismatch"),
        ({"crc32": 12345}, "checksum"),
        ({"codec": "fp64"}, "unknown_codec"),
        ({"params": {"block": 64}}, "unknown_codec"),
        ({"params": {1: 2}}, "bad_header"),
        ({"dtype": "int8"}, "bad_header"),
        ({"index": -1}, "bad_header"),
        ({"index": True}, "bad_header"),
        ({"index": 1.0}, "bad_header"),
        ({"stream": ""}, "bad_header"),
        ({"name": "x" * 2000}, "bad_header"),
        ({"kind": "chonk"}, "bad_kind"),
        ({"extra": 1}, "bad_header"),
    ],
)
def test_lying_headers(change: dict[str, Any], reason: str) -> None:
    header = {**_valid_header(_PAYLOAD), **change}
    assert _reason(_frame(header, _PAYLOAD)) == reason


def test_missing_field() -> None:
    header = _valid_header(_PAYLOAD)
    del header["crc32"]
    assert _reason(_frame(header, _PAYLOAD)) == "bad_header"


def test_preamble_errors() -> None:
    header = _valid_header(_PAYLOAD)
    assert _reason(_frame(header, _PAYLOAD, magic=b"FEDX")) == "bad_magic"
    assert _reason(_frame(header, _PAYLOAD, version=2)) == "version"
    assert _reason(_frame(header, _PAYLOAD, flags=1)) == "bad_flags"
    assert _reason(b"FEDQ\x01") == "truncated"
    assert _reason(struct.pack(">4sBBH", b"FEDQ", 1, 0, 500) + b"\x80") == "truncated"
    assert _reason(_frame(header, _PAYLOAD), wire.Limits(max_header_bytes=64)) == "too_large"
    assert _reason(_frame([1, 2, 3])) == "bad_header"
    assert _reason(struct.pack(">4sBBH", b"FEDQ", 1, 0, 1) + b"\xc1") == "bad_header"


def test_control_with_payload_or_bad_meta() -> None:
    assert _reason(_frame({"kind": "commit", "stream": "s", "meta": {}}, b"x")) == "length_mismatch"
    assert _reason(_frame({"kind": "commit", "stream": "s", "meta": 3})) == "bad_header"
    with pytest.raises(WireError):
        wire.encode_control("chunk", "s", {})


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_payload(bad: float) -> None:
    payload = struct.pack("<4f", 1.0, bad, 0.5, 0.25)
    assert _reason(_frame(_valid_header(payload), payload)) == "nonfinite"


@pytest.mark.parametrize("scale", [-1.0, 0.0, float("nan"), float("inf"), "big", None])
def test_fp16_bad_scale(scale: Any) -> None:
    payload = struct.pack("<4e", 1.0, -2.0, 0.5, 0.25)
    header = {**_valid_header(payload), "codec": "fp16", "meta": {"scale": scale}}
    assert _reason(_frame(header, payload)) == "codec"


def test_corrupt_lz4_block() -> None:
    frozen = torch.zeros(4096)
    raw = _chunk("fp32", frozen)
    header = _header_of(raw)
    assert header["lz4"] is True
    payload = raw[len(raw) - header["len"] :]
    lying = {**header, "raw_len": header["raw_len"] - 4, "count": 4095, "shape": [4095]}
    assert (
        _reason(_frame(lying, payload)) == "lz4"
    )  # the block would write past raw_len: refused, not allocated
    short = {**header, "raw_len": header["raw_len"] + 4, "count": 4097, "shape": [4097]}
    assert _reason(_frame(short, payload)) == "length_mismatch"
    garbage = b"\xff" * len(payload)
    assert _reason(_frame({**header, "crc32": zlib.crc32(garbage)}, garbage)) == "lz4"


def _samples() -> list[bytes]:
    return [make() for make in _golden().values()]


def _decode_fully(data: bytes) -> None:
    for msg, _ in wire.decode_all(data):
        if msg.kind == "chunk":
            wire.decode_tensor(msg)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sample=st.sampled_from(_samples()), data=st.data())
def test_truncations_raise_wire_error(sample: bytes, data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(sample) - 1))
    with pytest.raises(WireError):
        _decode_fully(sample[:cut])


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sample=st.sampled_from(_samples()), data=st.data())
def test_bit_flips_raise_only_wire_error(sample: bytes, data: st.DataObject) -> None:
    """A flip may leave a valid message (one letter of the stream id); a payload flip fails the checksum."""
    bit = data.draw(st.integers(0, 8 * len(sample) - 1))
    flipped = bytearray(sample)
    flipped[bit // 8] ^= 1 << (bit % 8)
    header_end = 8 + struct.unpack(">H", sample[6:8])[0]
    batch = sample[4] == 2  # its payload holds its parts' headers, which a flip may leave valid
    if bit // 8 < 8 or (bit // 8 >= header_end and not batch):
        with pytest.raises(WireError):
            _decode_fully(bytes(flipped))
    else:
        with contextlib.suppress(WireError):
            _decode_fully(bytes(flipped))


_msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(sorted(_valid_header(_PAYLOAD))), value=_msgpack_values)
def test_any_field_value_raises_only_wire_error(key: str, value: Any) -> None:
    header = {**_valid_header(_PAYLOAD), key: value}
    with contextlib.suppress(WireError):
        _decode_fully(_frame(header, _PAYLOAD))


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=300))
def test_random_bodies_raise_wire_error(body: bytes) -> None:
    with pytest.raises(WireError):
        _decode_fully(struct.pack(">4sBBH", b"FEDQ", 1, 0, len(body) // 2) + body)


@settings(max_examples=200, deadline=None)
@given(header=st.dictionaries(st.sampled_from(sorted(_valid_header(_PAYLOAD))), _msgpack_values, max_size=16))
def test_random_headers_raise_wire_error(header: dict[str, Any]) -> None:
    with pytest.raises(WireError):
        _decode_fully(_frame(header, _PAYLOAD))

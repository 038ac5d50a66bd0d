"""Fuzzing the untrusted edge (issue 7, "Bad input"): the wire decoder and the aggregator's consumer.

Why a fuzz test next to test_wire.py's hand-written cases: a hostile client or a corrupting network can send
*any* bytes, and the guarantee we sell is total — every malformed message raises a typed ``WireError`` with a
reason slug (never another exception, never a big allocation from a declared size), and through the consumer
every such message is dead-lettered with that reason and counted while the worker stays up and the global
model stays bit-identical to the model the honest updates alone give.

Everything is seeded (``random.Random(SEED)``, hypothesis ``derandomize``) so a failure reproduces in CI.
Counts: the systematic decoder fuzz makes ~17,200 cases (~17,000 of them malformed, the rest harmless flips
inside strings), hypothesis adds 1,000 (~970 malformed), and the consumer test pushes ~4,100 messages through
a live ``Aggregator``, ~3,350 of which must be dead-lettered.
"""

from __future__ import annotations

import hashlib
import math
import random
import struct
import threading
import time
import tracemalloc
import uuid
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lz4.block
import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedq import metrics, wire
from fedq.aggregation.service import Aggregator, Settings
from fedq.aggregation.strategies import FedBuff
from fedq.codecs import CODECS, Codec, get_codec
from fedq.errors import CodecError, WireError
from fedq.streaming import iter_container
from fedq.topology import Names
from fedq.transport import Transport, connect
from fedq.transport.base import REASON_HEADER
from fedq.transport.memory import MemoryTransport, named_broker
from tests.aggregation_helpers import delta_for, model_of, send_update, small_model, state, write_init

SEED = 20240607
PREAMBLE = struct.Struct(">4sBBH")
OK = "ok"  # the outcome of a message that is well formed after all (a harmless bit flip in a stream name)

# ----------------------------------------------------------------------------------------------------------
# Valid templates and framing helpers
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    """A valid message to mutate; ``kind`` is ``chunk``, ``manifest`` or ``commit``."""

    label: str
    kind: str
    body: bytes


def _chunk_body(codec: Codec, x: torch.Tensor, shape: tuple[int, ...], offset: int, label: str) -> bytes:
    return wire.encode_chunk(
        stream=f"fuzz/{label}",
        index=offset % 7,
        name=f"t.{label}",
        dtype=torch.float32,
        shape=shape,
        offset=offset,
        count=x.numel(),
        codec=codec,
        x=x,
    )


def chunk_templates() -> list[Template]:
    """For every codec: a whole-tensor chunk and, where alignment allows, an aligned middle chunk; plus
    lz4-compressed chunks, so the decompression path is fuzzed too."""
    g = torch.Generator().manual_seed(SEED)
    out: list[Template] = []
    for name in sorted(CODECS):
        codec = CODECS[name]()
        out.append(
            Template(
                f"{name}.whole",
                "chunk",
                _chunk_body(codec, torch.randn(2100, generator=g), (3, 700), 0, name),
            )
        )
        small = get_codec(name, block=64 if name == "int8" else 16) if codec.config() else codec
        step = small.alignment if small.alignment > 1 else 700
        x = torch.randn(step, generator=g) * 0.02
        out.append(Template(f"{name}.middle", "chunk", _chunk_body(small, x, (3 * step + 5,), step, name)))
    sparse = torch.zeros(4096)
    sparse[::64] = 0.25
    out.append(Template("fp32.lz4", "chunk", _chunk_body(CODECS["fp32"](), sparse, (4096,), 0, "lz4")))
    out.append(
        Template("int8.lz4", "chunk", _chunk_body(get_codec("int8", block=64), sparse, (4096,), 0, "lz4i8"))
    )
    assert sum(split(t.body)[0]["lz4"] for t in out) == 2, "the lz4 templates must really be compressed"
    return out


def _template(label: str) -> Template:
    return next(t for t in chunk_templates() if t.label == label)


def control_templates() -> list[Template]:
    """A manifest and a commit exactly as a client sends them."""
    model = {n: t[:2] for n, t in small_model().items()}
    messages = list(
        iter_container(
            model, stream="fuzz/update", meta={"update_id": "u", "base_version": 0}, chunk_bytes=512
        )
    )
    return [Template("manifest", "manifest", messages[0]), Template("commit", "commit", messages[-1])]


def split(body: bytes) -> tuple[dict[str, Any], bytes]:
    """(header, payload) of a valid message."""
    _, _, _, hlen = PREAMBLE.unpack_from(body)
    return msgpack.unpackb(body[8 : 8 + hlen], raw=False), body[8 + hlen :]


def frame(header: Any, payload: bytes, *, version: int = 1, flags: int = 0, hlen: int | None = None) -> bytes:
    """A message from raw parts; any lie the caller wants survives (``hlen`` may disagree with the header)."""
    packed = msgpack.packb(header, use_bin_type=True)
    return PREAMBLE.pack(b"FEDQ", version, flags, len(packed) if hlen is None else hlen) + packed + payload


def reframe(body: bytes, crc: bool = True, **changes: Any) -> bytes:
    """The message with header fields replaced; ``crc`` recomputes the checksum for a changed payload so that
    the lie under test is the only fault."""
    header, payload = split(body)
    payload = changes.pop("payload", payload)
    header.update(changes)
    if crc and header.get("kind") == "chunk" and "crc32" not in changes:
        header["crc32"] = zlib.crc32(payload)
    return frame(header, payload)


# ----------------------------------------------------------------------------------------------------------
# The oracle
# ----------------------------------------------------------------------------------------------------------


DEFAULT_LIMITS = wire.Limits()


def outcome(body: bytes, limits: wire.Limits = DEFAULT_LIMITS) -> str:
    """``ok`` or the WireError reason; any other exception propagates and fails the test (traceback kept)."""
    try:
        msg = wire.decode(body, limits)
        if msg.kind == wire.CHUNK:
            wire.decode_tensor(msg)
    except WireError as exc:
        assert isinstance(exc.reason, str) and exc.reason and exc.reason != WireError.reason, exc
        return exc.reason
    return OK


def wire_outcome(body: bytes) -> str:
    """What the consumer sees first: ``wire.decode`` only (chunks are decoded to tensors at commit)."""
    try:
        wire.decode(body)
    except WireError as exc:
        return exc.reason
    return OK


@dataclass(frozen=True)
class Case:
    """One fuzz input. ``expect``: the reasons it may raise; None = any WireError or ``ok`` (a mutation that
    may happen to be harmless, e.g. a flip inside a string)."""

    family: str
    body: bytes
    expect: frozenset[str] | None
    limits: wire.Limits = DEFAULT_LIMITS


def _c(family: str, body: bytes, *reasons: str) -> Case:
    return Case(family, body, frozenset(reasons))


# ----------------------------------------------------------------------------------------------------------
# Mutation families (each a generator of cases; seeded)
# ----------------------------------------------------------------------------------------------------------


def truncations(t: Template, rng: random.Random) -> Iterator[Case]:
    """Every cut inside preamble and header; cuts inside the payload (sampled) and extensions."""
    _, payload = split(t.body)
    end = len(t.body) - len(payload)
    for cut in range(end):
        yield _c("truncate.header", t.body[:cut], "truncated")
    cuts = sorted(rng.sample(range(end, len(t.body)), min(48, len(payload)))) if payload else []
    for cut in cuts:
        yield _c("truncate.payload", t.body[:cut], "length_mismatch")
    for extra in (b"\0", bytes(7), rng.randbytes(4096)):
        yield _c("extend", t.body + extra, "length_mismatch")


def preamble(t: Template, rng: random.Random) -> Iterator[Case]:
    """Magic bit flips, every wrong version and flags byte (sampled), header lengths that lie."""
    _, payload = split(t.body)
    rest = t.body[4:]
    for bit in range(32):
        magic = bytearray(b"FEDQ")
        magic[bit // 8] ^= 1 << (bit % 8)
        yield _c("preamble.magic", bytes(magic) + rest, "bad_magic")
    for v in [0, 2, 3, 127, 128, 255, *rng.sample(range(4, 255), 10)]:
        yield _c("preamble.version", t.body[:4] + bytes([v]) + t.body[5:], "version")
    for f in [1, 2, 128, 255, *rng.sample(range(3, 255), 10)]:
        yield _c("preamble.flags", t.body[:5] + bytes([f]) + t.body[6:], "bad_flags")
    hlen = len(t.body) - 8 - len(payload)
    packed = t.body[8 : 8 + hlen]
    for lie in {0, 1, hlen - 1, hlen // 2, hlen + 1, hlen + len(payload), hlen + len(payload) + 1, 0xFFFF}:
        if lie != hlen:
            body = PREAMBLE.pack(b"FEDQ", 1, 0, lie) + packed + payload
            yield _c("preamble.hlen", body, "truncated", "bad_header")
    yield Case("preamble.limit", t.body, frozenset({"too_large"}), wire.Limits(max_header_bytes=hlen - 1))


def bit_flips(t: Template, rng: random.Random, n: int = 300) -> Iterator[Case]:
    """1-4 random bit flips anywhere: most are caught, a few (inside a string) leave a valid message."""
    for _ in range(n):
        data = bytearray(t.body)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(len(data))
            data[pos] ^= 1 << rng.randrange(8)
        yield Case("flip.anywhere", bytes(data), None)


def payload_flips(t: Template, rng: random.Random, n: int = 200) -> Iterator[Case]:
    """Flips inside the payload with the stale CRC: always ``checksum`` (CRC-32 catches <= 4 flipped bits)."""
    _, payload = split(t.body)
    start = len(t.body) - len(payload)
    for _ in range(n):
        data = bytearray(t.body)
        for _ in range(rng.randint(1, 4)):
            data[start + rng.randrange(len(payload))] ^= 1 << rng.randrange(8)
        if bytes(data) != t.body:
            yield _c("flip.payload", bytes(data), "checksum")


# Values of every wrong type, for fields that expect another type.
WRONG_TYPES: list[Any] = [
    None,
    True,
    False,
    -1,
    2**64 - 1,
    2**63,
    1.5,
    float("nan"),
    "x",
    b"x",
    [],
    [1],
    {},
    {"a": 1},
]
CHUNK_TYPES: dict[str, type] = {
    "kind": str,
    "stream": str,
    "index": int,
    "name": str,
    "dtype": str,
    "shape": list,
    "offset": int,
    "count": int,
    "codec": str,
    "params": dict,
    "meta": dict,
    "lz4": bool,
    "raw_len": int,
    "len": int,
    "crc32": int,
}


def _wrong_for(typ: type, value: Any) -> bool:
    if typ is int:
        return not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63
    return not isinstance(value, typ)


def header_types(t: Template, rng: random.Random) -> Iterator[Case]:
    """Wrong types, missing and extra fields, empty and over-long strings: ``bad_header`` (``bad_kind`` for
    the field that picks the parser)."""
    header, payload = split(t.body)
    types = CHUNK_TYPES if t.kind == "chunk" else {"kind": str, "stream": str, "meta": dict}
    for key, typ in types.items():
        for value in WRONG_TYPES:
            if _wrong_for(typ, value):
                yield _c(
                    "header.type",
                    reframe(t.body, crc=False, **{key: value}),
                    "bad_kind" if key == "kind" else "bad_header",
                )
        missing = {k: v for k, v in header.items() if k != key}
        yield _c("header.missing", frame(missing, payload), "bad_kind" if key == "kind" else "bad_header")
        if typ is str and key != "kind":
            for bad in ("", "é" * 513, "x" * 1025):
                yield _c("header.string", reframe(t.body, crc=False, **{key: bad}), "bad_header")
    yield _c("header.extra", reframe(t.body, crc=False, extra=1), "bad_header")
    yield _c("header.extra", reframe(t.body, crc=False, **{"": 0}), "bad_header")
    yield _c("header.kind", reframe(t.body, crc=False, kind="Chunk"), "bad_kind")
    other = "manifest" if t.kind == "chunk" else "chunk"
    yield _c("header.kind", reframe(t.body, crc=False, kind=other), "bad_header")


def _fits(codec: Codec, offset: int, count: int, numel: int, raw_len: int) -> bool:
    """Whether a slice is valid for ``codec`` too (then changing the parameters is no lie)."""
    aligned = offset % codec.alignment == 0 and (count % codec.alignment == 0 or offset + count == numel)
    return aligned and codec.payload_nbytes(count) == raw_len


def _numel(shape: list[Any]) -> int:
    return math.prod(shape)


def chunk_lies(t: Template, rng: random.Random) -> Iterator[Case]:
    """Well-typed chunk headers whose dtype, shape, slice, codec, parameters, lengths or CRC lie; the payload
    CRC is recomputed, so the lie is the only fault. Enormous sizes must fail before any allocation."""
    h, payload = split(t.body)
    numel, offset, count = _numel(h["shape"]), h["offset"], h["count"]
    body = t.body

    def lie(family: str, *reasons: str, **changes: Any) -> Case:
        return _c(family, reframe(body, **changes), *reasons)

    for dtype in ("float64", "int8", "Float32", "float32 ", "bool", "uint8"):
        yield lie("lie.dtype", "bad_header", dtype=dtype)
    big = wire.Limits().max_elements
    for shape in (
        [1] * 9,
        [2**62],
        [big + 1],
        [2**20, 2**20],
        [2**34, 2**34, 2**34],
        [-1],
        [True],
        [1.5],
        ["a"],
        [[numel]],
        [None],
    ):
        yield lie("lie.shape.huge", "too_large", shape=shape)
    for shape in ([], [0], [offset + count - 1], [1, offset + count - 1]):
        if _numel(shape) < offset + count:
            yield lie("lie.shape.small", "length_mismatch", shape=shape)
    for off in (numel, numel - count + 1, 2**62, 2**63 - 1):
        if off + count > numel:
            yield lie("lie.offset", "length_mismatch", offset=off)
    if get_codec(h["codec"], **h["params"]).alignment > 1 or offset + 1 + count > numel:
        yield lie("lie.offset", "bad_header", "length_mismatch", offset=offset + 1)
    for c in (2**62, 2**63 - 1, wire.Limits().max_chunk_elements + 1):
        yield lie("lie.count.huge", "too_large", count=c)
    for c in (count + 1, count - 1, 0, count * 2, count // 2):
        if c != count and c >= 0:
            yield lie("lie.count", "bad_header", "length_mismatch", count=c)
    for name in ("fp64", "FP32", "nf4 ", "int4", "q8", "none", "\x00", "lz4"):
        yield lie("lie.codec.unknown", "unknown_codec", codec=name)
    swaps = [c for c in sorted(CODECS) if c != h["codec"] and {c, h["codec"]} != {"nf4", "fp4"}]
    for name in swaps:  # nf4 <-> fp4 have the same sizes and parameters: both valid, no lie
        yield lie("lie.codec.swap", "unknown_codec", "bad_header", "length_mismatch", "codec", codec=name)
    for params in (
        {"block": 3},
        {"block": 0},
        {"block": 2**62},
        {"block": "64"},
        {"block": 64.0},
        {"block": True},
        {"bogus": 1},
        {"block": 64, "x": 1},
        {"block": None},
    ):
        if params != h["params"]:
            yield lie("lie.params", "unknown_codec", params=params)
    for block in [h["params"]["block"] * 2, h["params"]["block"] // 2] if h["params"] else []:
        try:
            other = get_codec(h["codec"], block=block)
        except CodecError:
            yield lie("lie.params", "unknown_codec", params={"block": block})
            continue
        if not _fits(other, offset, count, numel, h["raw_len"]):
            yield lie("lie.params", "bad_header", "length_mismatch", params={"block": block})
    yield _c("lie.params", frame({**h, "params": {1: 2}}, payload), "bad_header")  # int key: strict_map_key
    yield _c("lie.meta", frame({**h, "meta": {1: 2.0}}, payload), "bad_header")
    metas: list[dict[str, Any]] = [{"bogus": 1.0}, {"scale": 1.0, "x": 0}]
    if h["codec"] == "fp16":
        metas += [
            {},
            {"scale": math.nan},
            {"scale": math.inf},
            {"scale": -1.0},
            {"scale": 0.0},
            {"scale": "1"},
            {"scale": 1},
            {"scale": 2.0**120},
            {"scale": None},
        ]
    for meta in metas:
        yield lie("lie.meta", "codec", meta=meta)
    yield lie("lie.lz4", "length_mismatch", lz4=not h["lz4"])
    for raw_len in (h["raw_len"] + 1, h["raw_len"] - 1, 0, h["len"]):
        if raw_len != h["raw_len"]:
            yield lie("lie.raw_len", "length_mismatch", raw_len=raw_len)
    for raw_len in (2**62, wire.Limits().max_payload_bytes + 1):
        yield lie("lie.raw_len.huge", "too_large", raw_len=raw_len)
    for n in (h["len"] + 1, h["len"] - 1, 0, 2**62, 2**63 - 1):
        if n != h["len"]:
            yield lie("lie.len", "length_mismatch", len=n)
    for crc in (h["crc32"] ^ 1, h["crc32"] + 1, 2**32, 2**63 - 1, h["crc32"] ^ 0x80000000):
        yield lie("lie.crc32", "checksum", crc32=crc)


def _special_payload(
    codec: Codec, count: int, value: float, rng: random.Random
) -> tuple[dict[str, Any], bytes]:
    """A payload of ``codec`` that decodes to ``value`` (NaN/Inf) somewhere; quantizing codecs get the special
    value in a block scale or in scales that overflow, since their codes cannot express it."""
    x = torch.randn(count, generator=torch.Generator().manual_seed(rng.randrange(2**31)))
    meta, raw = codec.encode(x)
    data = bytearray(memoryview(raw).cast("B"))
    where = rng.randrange(count)
    if codec.name in ("fp32", "bf16", "fp16"):
        width = 4 if codec.name == "fp32" else 2
        item = struct.pack("<f", value) if width == 4 else _half_bits(codec.name, value)
        data[where * width : (where + 1) * width] = item
    elif codec.name == "int8":  # fp32 block maxima first: NaN/Inf/negative there
        b = rng.randrange(-(-count // codec.alignment))
        data[4 * b : 4 * b + 4] = struct.pack("<f", value)
    else:  # 4-bit: fp32 group steps, then fp32 group minima; NaN/Inf there, or both so big scales overflow
        nblocks = -(-count // codec.config()["block"])
        ngroups = -(-nblocks // 256)
        g = rng.randrange(ngroups)
        if math.isnan(value) or rng.random() < 0.5:
            at = 4 * g + (4 * ngroups if rng.random() < 0.5 else 0)
            data[at : at + 4] = struct.pack("<f", value)
        else:
            data[4 * g : 4 * g + 4] = struct.pack("<f", 3e38)
            data[4 * ngroups + 4 * g : 4 * ngroups + 4 * g + 4] = struct.pack("<f", 3e38)
    return meta, bytes(data)


def _half_bits(codec: str, value: float) -> bytes:
    if codec == "bf16":
        return struct.pack("<f", value)[2:]
    return struct.pack("<e", value)


def nonfinite(t: Template, rng: random.Random, n: int = 12) -> Iterator[Case]:
    """NaN/Inf payloads with a correct CRC: they pass ``decode`` and must be caught by ``decode_tensor``."""
    h, _ = split(t.body)
    codec = CODECS[h["codec"]](**h["params"])
    for i in range(n):
        value = (math.nan, math.inf, -math.inf)[i % 3]
        meta, raw = _special_payload(codec, h["count"], value, rng)
        body = wire.frame_chunk(
            stream=h["stream"],
            index=h["index"],
            name=h["name"],
            dtype=torch.float32,
            shape=h["shape"],
            offset=h["offset"],
            count=h["count"],
            codec=codec,
            codec_meta=meta,
            raw=raw,
        )
        yield _c("nonfinite", body, "nonfinite", "codec")


def lz4_corruption(t: Template, rng: random.Random, n: int = 200) -> Iterator[Case]:
    """Corrupt lz4 blocks with a recomputed CRC: refused as ``lz4``/``length_mismatch``, or, where the
    corruption still decompresses to exactly ``raw_len`` bytes, decoded to finite values or refused."""
    h, payload = split(t.body)
    for i in range(n):
        data = bytearray(payload)
        if i % 4 == 0:
            data = data[: rng.randrange(1, len(data))]
        elif i % 4 == 1:
            data += rng.randbytes(rng.randint(1, 16))
        else:
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        if len(data) >= h["raw_len"] or bytes(data) == payload:
            continue
        yield Case("lz4.corrupt", reframe(t.body, payload=bytes(data), len=len(data)), None)


def not_a_map(rng: random.Random) -> Iterator[Case]:
    """Headers that are not maps, not msgpack, or pathologically nested."""
    values: list[Any] = [None, 0, 1, -1, "chunk", b"chunk", [], ["chunk"], 1.5, True, [{}], [[[]]]]
    for v in values:
        yield _c("header.not_map", frame(v, b""), "bad_header")
    raw = [
        b"\xc1",
        b"\x91",
        b"\xdc\xff\xff",
        b"\x81\xa4kind",
        b"\xd4\x01\x02",
        b"\x91" * 60000 + b"\xc0",
        b"\x81" * 30000 + b"\xc0",
    ]
    for r in raw:
        yield _c("header.not_msgpack", PREAMBLE.pack(b"FEDQ", 1, 0, len(r)) + r, "bad_header")
    yield _c("header.ext", frame(msgpack.ExtType(5, b"xx"), b""), "bad_header")
    for _ in range(250):
        r = rng.randbytes(rng.randint(1, 64))
        yield Case(
            "header.random",
            PREAMBLE.pack(b"FEDQ", 1, 0, len(r)) + r + rng.randbytes(rng.randint(0, 8)),
            frozenset({"bad_header", "bad_kind"}),
        )
    yield _c("empty", b"", "truncated")
    yield _c("short", b"FEDQ\x01", "truncated")


def control_lies(t: Template, rng: random.Random) -> Iterator[Case]:
    """Manifests and commits with a payload (control messages carry none)."""
    for extra in (b"\0", rng.randbytes(100)):
        yield _c("control.payload", t.body + extra, "length_mismatch")


def decoder_cases() -> Iterator[Case]:
    """All systematic cases, in a fixed order."""
    rng = random.Random(SEED)
    chunks, controls = chunk_templates(), control_templates()
    for t in chunks + controls:
        yield from truncations(t, rng)
        yield from preamble(t, rng)
        yield from bit_flips(t, rng)
        yield from header_types(t, rng)
    for t in chunks:
        yield from payload_flips(t, rng)
        yield from chunk_lies(t, rng)
        yield from nonfinite(t, rng)
        if split(t.body)[0]["lz4"]:
            yield from lz4_corruption(t, rng)
    for t in controls:
        yield from control_lies(t, rng)
    yield from not_a_map(rng)


# ----------------------------------------------------------------------------------------------------------
# 1. Decoder fuzz
# ----------------------------------------------------------------------------------------------------------


def test_decoder_refuses_every_malformed_message_with_a_reason() -> None:
    """>= 10,000 malformed messages: each raises WireError with its expected reason slug, nothing else."""
    reasons: Counter[str] = Counter()
    families: Counter[str] = Counter()
    survivors: Counter[str] = Counter()
    for case in decoder_cases():
        try:
            got = outcome(case.body, case.limits)
        except Exception as exc:  # anything but WireError escaping is the bug this test hunts
            raise AssertionError(
                f"{case.family}: {type(exc).__name__}: {exc} for {case.body[:120]!r}"
            ) from exc
        if case.expect is not None:
            assert got in case.expect, f"{case.family}: got {got!r}, expected {sorted(case.expect)}"
        if got == OK:
            survivors[case.family] += 1
            continue
        reasons[got] += 1
        families[case.family] += 1
    total = sum(reasons.values())
    print(f"\ndecoder fuzz: {total} malformed messages refused, {sum(survivors.values())} harmless mutations")
    print("  by reason:", dict(reasons.most_common()))
    print("  by family:", dict(families.most_common()))
    print("  well-formed after mutation:", dict(survivors))
    assert total >= 10_000
    assert set(survivors) <= {"flip.anywhere", "lz4.corrupt"}, survivors
    assert {
        "truncated",
        "bad_magic",
        "version",
        "bad_flags",
        "bad_header",
        "bad_kind",
        "too_large",
        "length_mismatch",
        "unknown_codec",
        "checksum",
        "lz4",
        "codec",
        "nonfinite",
    } <= set(reasons)


ENORMOUS_BYTES = 1 << 20


def enormous_cases() -> Iterator[Case]:
    """Headers declaring huge sizes around tiny payloads."""
    for t in chunk_templates():
        for case in chunk_lies(t, random.Random(SEED)):
            if case.family.endswith(".huge") or case.family in ("lie.len", "lie.offset"):
                yield case
    h, payload = split(_template("fp32.whole").body)
    count = 1 << 24  # 64 MiB of fp32 declared, a few bytes sent, not compressed
    yield _c(
        "huge.plain",
        frame({**h, "shape": [count], "count": count, "raw_len": 4 * count, "len": 4 * count}, payload),
        "length_mismatch",
    )
    yield _c("huge.hlen", PREAMBLE.pack(b"FEDQ", 1, 0, 0xFFFF) + b"\x80", "truncated")


def test_enormous_declared_sizes_allocate_nothing() -> None:
    """No allocation from an unvalidated size: decoding a lying header stays within a MiB (tracemalloc sees
    Python and lz4 buffers; torch tensors are only made after the payload length is checked)."""
    n = 0
    for case in enormous_cases():
        tracemalloc.start()
        try:
            got = outcome(case.body, case.limits)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert case.expect is not None and got in case.expect, (case.family, got)
        assert peak < ENORMOUS_BYTES, f"{case.family}: decoding {len(case.body)} bytes peaked at {peak} bytes"
        n += 1
    assert n >= 100


def test_lz4_decompression_is_bounded_by_the_message_size() -> None:
    """A tiny lz4 payload claiming a 64 MiB raw size should be refused without a 64 MiB buffer."""
    h, _ = split(_template("fp32.whole").body)
    payload = lz4.block.compress(bytes(1000), store_size=False)
    count = 1 << 24
    body = frame(
        {
            **h,
            "shape": [count],
            "count": count,
            "lz4": True,
            "raw_len": 4 * count,
            "len": len(payload),
            "crc32": zlib.crc32(payload),
        },
        payload,
    )
    tracemalloc.start()
    try:
        got = outcome(body)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got in ("length_mismatch", "lz4")
    assert peak < 300 * len(body) + ENORMOUS_BYTES, f"{len(body)}-byte message peaked at {peak} bytes"


# Hypothesis: arbitrary msgpack values in arbitrary fields, plus random flips; derandomized for CI.
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=6)
    | st.binary(max_size=6)
)
_VALUES = st.recursive(
    _SCALARS,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
    max_leaves=8,
)
_TEMPLATES = chunk_templates() + control_templates()


@settings(
    max_examples=1000, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)
@given(
    index=st.integers(0, len(_TEMPLATES) - 1),
    changes=st.dictionaries(st.sampled_from([*CHUNK_TYPES, "extra"]), _VALUES, max_size=3),
    drop=st.lists(st.sampled_from(list(CHUNK_TYPES)), max_size=2),
    flips=st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 7)), max_size=3),
)
def test_hypothesis_headers_and_flips(
    index: int, changes: dict[str, Any], drop: list[str], flips: list[tuple[int, int]]
) -> None:
    """Whatever the header holds, decoding raises WireError or yields a message whose tensor decodes."""
    header, payload = split(_TEMPLATES[index].body)
    header.update(changes)
    for key in drop:
        header.pop(key, None)
    data = bytearray(frame(header, payload))
    for pos, bit in flips:
        data[pos % len(data)] ^= 1 << bit
    outcome(bytes(data))


# ----------------------------------------------------------------------------------------------------------
# 2. Consumer fuzz: the real Aggregator on the in-memory broker
# ----------------------------------------------------------------------------------------------------------

UPDATE_TIMEOUT = 8.0  # incomplete (orphan) streams are dropped after this; honest streams complete in ms
WIRE_GARBAGE = 3000  # wire-malformed messages through the consumer (the rest of the families add ~800)


@dataclass
class Ledger:
    """What the test expects of the consumer: dead letters (body digest, reason), duplicate acks, orphans."""

    dead: Counter[tuple[str, str]]
    duplicates: int = 0
    orphan_streams: int = 0
    sent: int = 0

    def dead_letter(self, t: Transport, body: bytes, reason: str, names: Names) -> None:
        """Publish a message that must come back from the dead-letter queue with ``reason``."""
        t.publish(names.updates_exchange, names.shard_key(0), body)
        self.dead[(_digest(body), reason)] += 1
        self.sent += 1

    def expect(self, body: bytes, reason: str) -> None:
        self.dead[(_digest(body), reason)] += 1

    def publish(self, t: Transport, body: bytes, names: Names, *, duplicate: bool = False) -> None:
        """Publish a message that is acked (staged, or ``duplicate``: acked without effect)."""
        t.publish(names.updates_exchange, names.shard_key(0), body)
        self.duplicates += duplicate
        self.sent += 1


def _digest(body: bytes) -> str:
    return hashlib.sha1(body).hexdigest()


class AggregatorThread:
    """The real ``Aggregator.run`` in a thread, with a handle on the object (the test reads nothing private
    from it; ``error`` is whatever escaped ``run``)."""

    def __init__(self, broker: str, config: Settings) -> None:
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(broker, config), daemon=True)
        self.thread.start()

    def _run(self, broker: str, config: Settings) -> None:
        try:
            with connect(f"memory://aggregator@{broker}") as t:
                Aggregator(t, config).run(self.stop)
        except BaseException as exc:  # reported by the test
            self.error = exc

    def alive(self) -> bool:
        return self.thread.is_alive() and self.error is None

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive(), "aggregator did not stop"
        if self.error is not None:
            raise self.error


def _setup(tmp: Path) -> tuple[str, Names, Settings]:
    broker, names = f"fuzz-{uuid.uuid4().hex[:8]}", Names(f"t{uuid.uuid4().hex[:8]}")
    with connect(f"memory://setup@{broker}") as t:
        t.declare(names, 1)
    tmp.mkdir(parents=True, exist_ok=True)
    init = write_init(tmp, small_model())
    config = Settings(
        names=names,
        strategy=FedBuff(buffer_size=1, server_lr=1.0, staleness="constant"),
        init=init,
        state_dir=tmp / "state",
        update_timeout=UPDATE_TIMEOUT,
        chunk_bytes=4096,
        max_streams_per_user=100_000,  # every malformed message is refused for its own reason, not a quota
    )
    return broker, names, config


def _wait(predicate: Callable[[], bool], what: str, worker: AggregatorThread, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert worker.alive(), f"aggregator died while waiting for {what}: {worker.error!r}"
        assert time.monotonic() < deadline, f"{what} not reached in {timeout} s"
        time.sleep(0.05)


def _version(state_dir: Path, version: int) -> Callable[[], bool]:
    def reached() -> bool:
        s = state(state_dir)
        return s.get("published", -1) >= version and s.get("announced", -1) >= version

    return reached


HONEST = {"A": 0, "B": 1, "C": 2}  # update id -> base version (the version current when it is sent)


def honest(update_id: str) -> dict[str, torch.Tensor]:
    return delta_for(ord(update_id), small_model())


def _honest_messages(update_id: str) -> list[bytes]:
    meta = {"update_id": update_id, "base_version": HONEST[update_id], "kind": "delta", "num_samples": 1}
    return list(
        iter_container(honest(update_id), stream=f"update/{update_id}/s0", meta=meta, chunk_bytes=4096)
    )


def reference_model(tmp: Path) -> dict[str, torch.Tensor]:
    """The model the honest updates alone give, on the same code path (a second, garbage-free run)."""
    broker, names, config = _setup(tmp)
    worker = AggregatorThread(broker, config)
    try:
        with connect(f"memory://alice@{broker}") as alice:
            for version, update_id in enumerate(HONEST, start=1):
                send_update(
                    alice, names, honest(update_id), shards=1, update_id=update_id, base_version=version - 1
                )
                _wait(_version(config.state_dir, version), f"reference version {version}", worker)
    finally:
        worker.close()
    return model_of(config.state_dir)


def wire_garbage(n: int) -> list[tuple[bytes, str]]:
    """``n`` decoder-fuzz messages that ``wire.decode`` refuses, spread over every family, with the reason."""
    picked = [
        (c.body, r)
        for c in decoder_cases()
        if c.limits == wire.Limits() and (r := wire_outcome(c.body)) != OK
    ]
    step = max(1, len(picked) // n)
    return picked[::step][:n]


def _model_chunk(
    name: str,
    *,
    stream: str,
    index: int = 0,
    shape: tuple[int, ...] | None = None,
    x: torch.Tensor | None = None,
) -> bytes:
    """A well-formed fp32 chunk claiming to be part of tensor ``name`` (maybe of the wrong shape)."""
    model = small_model()
    if shape is None:
        shape = tuple(model[name].shape) if name in model else (8,)
    count = min(256, math.prod(shape))
    x = torch.full((count,), 0.5) if x is None else x
    return wire.encode_chunk(
        stream=stream,
        index=index,
        name=name,
        dtype=torch.float32,
        shape=shape,
        offset=0,
        count=count,
        codec=CODECS["fp32"](),
        x=x,
    )


def _patch_chunk(body: bytes, fn: Callable[[bytearray, dict[str, Any]], None]) -> bytes:
    """Change an (uncompressed) chunk's payload and re-frame it with a correct CRC."""
    h, payload = split(body)
    assert not h["lz4"]
    data = bytearray(payload)
    fn(data, h)
    return reframe(body, payload=bytes(data))


def _bad_stream(kind: str, k: int, codec: str = "fp32", **extra: Any) -> list[bytes]:
    """An update stream (manifest, chunks, commit) of mallory's, to be spoiled by the caller."""
    g = torch.Generator().manual_seed(k)
    d = {n: 0.01 * torch.randn(t.shape, generator=g) for n, t in small_model().items()}
    meta = {"update_id": f"bad-{kind}-{k}", "base_version": 1, "kind": "delta", "num_samples": 1, **extra}
    params = {"block": 64} if codec == "int8" else {}
    return list(
        iter_container(
            d,
            stream=f"bad/{kind}/{k}",
            meta=meta,
            chunk_bytes=4096,
            codec_for=lambda n, t: CODECS[codec](**params),
        )
    )


def _poke(msgs: list[bytes], value: float, width: int, rng: random.Random) -> list[bytes]:
    """The stream with ``value`` written over one element of one chunk (CRC recomputed)."""
    i = rng.randrange(1, len(msgs) - 1)
    item = struct.pack("<f", value)[4 - width :]

    def put(data: bytearray, h: dict[str, Any]) -> None:
        at = width * rng.randrange(len(data) // width)
        data[at : at + width] = item

    return [*msgs[:i], _patch_chunk(msgs[i], put), *msgs[i + 1 :]]


def _nan_scale(data: bytearray, h: dict[str, Any]) -> None:
    data[0:4] = struct.pack("<f", math.nan)


def bad_streams(rng: random.Random) -> Iterator[tuple[str, list[bytes], str]]:
    """Complete, well-framed update streams that must be refused when they complete: (kind, messages, reason).
    Their chunks are staged and acked; the completing message (the commit) is dead-lettered."""
    for k in range(8):
        yield "nan.fp32", _poke(_bad_stream("nan", k), math.nan, 4, rng), "nonfinite"
        yield (
            "inf.bf16",
            _poke(_bad_stream("inf", k, "bf16"), (math.inf, -math.inf)[k % 2], 2, rng),
            "nonfinite",
        )
        int8 = _bad_stream("int8", k, "int8")
        yield "nan-scale.int8", [int8[0], _patch_chunk(int8[1], _nan_scale), *int8[2:]], "codec"
        fp16 = _bad_stream("fp16", k, "fp16")
        yield "bad-scale.fp16", [fp16[0], reframe(fp16[1], meta={"scale": -1.0}), *fp16[2:]], "codec"
        yield "stale", _bad_stream("stale", k, base_version=99 + k), "stale"
        msgs = _bad_stream("swap", k)
        i, j = 1, len(msgs) - 2
        hi, hj = split(msgs[i])[0]["index"], split(msgs[j])[0]["index"]
        swapped = [
            msgs[0],
            reframe(msgs[i], index=hj),
            *msgs[i + 1 : j],
            reframe(msgs[j], index=hi),
            msgs[-1],
        ]
        yield "swapped-index", swapped, "bad_manifest"
        msgs = _bad_stream("short", k)  # chunk 1 claims half the slice its manifest assigns
        h1, p1 = split(msgs[1])
        half = h1["count"] // 2
        short = reframe(msgs[1], count=half, raw_len=4 * half, len=4 * half, payload=p1[: 4 * half])
        yield "wrong-slice", [msgs[0], short, *msgs[2:]], "bad_manifest"


def bad_manifests(k: int) -> Iterator[tuple[bytes, str, bool]]:
    """Well-framed manifests the consumer refuses on arrival: (body, reason, whether the stream is refused so
    that its later messages are acked without effect)."""
    good = split(_honest_messages("A")[0])[0]["meta"]
    rows = good["tensors"]
    s = f"badman/{k}"
    unknown = [["nope", *rows[0][1:]], *rows[1:]]
    # a consistent entry (one chunk of 9 elements) for a tensor the model has with another shape
    shape = [[rows[0][0], rows[0][1], [3, 3], rows[0][3], 1, rows[0][5]], *rows[1:]]
    reshaped = {**good, "tensors": shape, "chunks": good["chunks"] - rows[0][4] + 1}
    yield (
        wire.encode_control("manifest", s + "/unknown", {**good, "tensors": unknown}),
        "unknown_tensor",
        True,
    )
    yield wire.encode_control("manifest", s + "/shape", reshaped), "shape_mismatch", True
    yield (
        wire.encode_control("manifest", s + "/noid", {k: v for k, v in good.items() if k != "update_id"}),
        "bad_manifest",
        True,
    )
    yield wire.encode_control("manifest", s + "/kind", {**good, "kind": "poison"}), "bad_manifest", True
    yield wire.encode_control("manifest", s + "/samples", {**good, "num_samples": -5}), "bad_manifest", True
    yield (
        wire.encode_control("manifest", s + "/count", {**good, "chunks": good["chunks"] + 1}),
        "bad_manifest",
        False,
    )
    yield wire.encode_control("manifest", s + "/rows", {**good, "tensors": "all"}), "bad_manifest", False
    yield (
        wire.encode_control(
            "manifest",
            s + "/huge",
            {**good, "tensors": [["x", "float32", [2**62], "fp32", 1, 1]], "chunks": 1},
        ),
        "bad_manifest",
        False,
    )


def _counter_by_reason(counter: Any, role: str) -> Counter[str]:
    out: Counter[str] = Counter()
    for family in counter.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels.get("role") == role:
                out[sample.labels["reason"]] += int(sample.value)
    return out


def _counter_value(counter: Any, **labels: str) -> float:
    return sum(
        s.value
        for family in counter.collect()
        for s in family.samples
        if s.name.endswith("_total") and all(s.labels.get(k) == v for k, v in labels.items())
    )


def _by_reason(dead: Counter[tuple[str, str]]) -> Counter[str]:
    out: Counter[str] = Counter()
    for (_, reason), n in dead.items():
        out[reason] += n
    return out


def _drain_dead_letters(broker: str, names: Names) -> list[tuple[str, str]]:
    out = []
    with connect(f"memory://ops@{broker}") as ops:
        ops.consume(names.dead_letter_queue, prefetch=256)
        while (d := ops.get(1.0)) is not None:
            out.append((_digest(d.body), str(d.headers.get(REASON_HEADER) or "")))
            ops.ack(d)
    return out


@pytest.mark.slow
def test_consumer_survives_garbage_and_the_model_is_bit_identical(tmp_path: Path) -> None:
    """Honest A, then garbage (with foreign and duplicate messages around honest B), then more garbage and
    honest C. Every malformed message is dead-lettered with its reason and counted; duplicates of known
    messages are acked without effect; orphan streams are dropped at the update timeout; the worker stays up;
    the model equals the garbage-free run's bit for bit."""
    expected = reference_model(tmp_path / "reference")
    broker, names, config = _setup(tmp_path / "fuzz")
    rejected0 = _counter_by_reason(metrics.REJECTED, "aggregator")
    dead0 = _counter_by_reason(metrics.DEAD_LETTERED, "aggregator")
    dup0 = _counter_value(metrics.CHUNKS, role="aggregator", event="duplicate")
    dropped0 = _counter_value(metrics.UPDATES, role="aggregator", event="dropped_incomplete")
    rng = random.Random(SEED)
    garbage = wire_garbage(WIRE_GARBAGE)
    ledger = Ledger(Counter())
    started = time.monotonic()
    worker = AggregatorThread(broker, config)
    nobody = MemoryTransport(named_broker(broker), user="")  # a message without a validated user_id
    try:
        with connect(f"memory://alice@{broker}") as alice, connect(f"memory://mallory@{broker}") as mallory:
            a_msgs = _honest_messages("A")
            for body in a_msgs:
                ledger.publish(alice, body, names)
            _wait(_version(config.state_dir, 1), "version 1", worker)
            # orphans first, so that they have expired by the end: well-formed chunks whose stream never gets
            # a manifest (a chunk may precede its manifest, so the consumer stages them and drops them later)
            for k in range(10):
                for i in range(12):
                    name = list(small_model())[i % 4]
                    ledger.publish(mallory, _model_chunk(name, stream=f"orphan/{k}", index=i), names)
                ledger.orphan_streams += 1
            for k in range(5):  # a valid manifest and nothing else
                ledger.publish(
                    mallory,
                    wire.encode_control(
                        "manifest",
                        f"orphan-m/{k}",
                        {**split(a_msgs[0])[0]["meta"], "update_id": f"o{k}", "base_version": 1},
                    ),
                    names,
                )
                ledger.orphan_streams += 1
            mallory.flush()
            first = garbage[: len(garbage) // 2]
            for n, (body, reason) in enumerate(first):
                ledger.dead_letter(mallory, body, reason, names)
                if n % 10 == 0:  # duplicates of a folded stream: acked without effect
                    ledger.publish(alice, rng.choice(a_msgs), names, duplicate=True)
                if n % 25 == 0:
                    ledger.dead_letter(nobody, rng.choice([*a_msgs, body]), "unauthorised", names)
                if n % 20 == 0:
                    ledger.dead_letter(
                        mallory, _model_chunk(f"nope.{n}", stream=f"u/{n}"), "unknown_tensor", names
                    )
                    name = list(small_model())[n % 4]
                    ledger.dead_letter(
                        mallory,
                        _model_chunk(name, stream=f"s/{n}", shape=(7, n + 1)),
                        "shape_mismatch",
                        names,
                    )
            for k in range(10):
                for body, reason, refuses in bad_manifests(k):
                    ledger.dead_letter(mallory, body, reason, names)
                    if refuses:  # later messages of a refused stream: acked without effect
                        stream = split(body)[0]["stream"]
                        ledger.publish(mallory, _model_chunk("head", stream=stream), names, duplicate=True)
                        ledger.publish(
                            mallory,
                            wire.encode_control("commit", stream, {"chunks": 5}),
                            names,
                            duplicate=True,
                        )
            for _, msgs, reason in bad_streams(rng):
                for body in msgs[:-1]:
                    ledger.publish(mallory, body, names)
                ledger.dead_letter(mallory, msgs[-1], reason, names)
            mallory.flush()
            # honest B, with mallory writing alice's stream id (it names mallory's own stream: streams are
            # keyed by the validated user; hers never completes and is dropped) and duplicates in the middle
            b_msgs = _honest_messages("B")
            half = len(b_msgs) // 2
            for body in b_msgs[:half]:
                ledger.publish(alice, body, names)
            for body in b_msgs[:-1]:
                ledger.publish(mallory, body, names)
            ledger.orphan_streams += 1
            bad_chunk = _model_chunk("head", stream="update/B/s0", index=1, x=torch.full((256,), 1e3))
            ledger.publish(mallory, bad_chunk, names, duplicate=True)  # mallory's own chunk 1 is staged
            for body in b_msgs[1:half]:
                ledger.publish(alice, body, names, duplicate=True)
            for body in b_msgs[half:]:
                ledger.publish(alice, body, names)
            alice.flush()
            mallory.flush()
            _wait(_version(config.state_dir, 2), "version 2", worker)
            for body, reason in garbage[len(garbage) // 2 :]:
                ledger.dead_letter(mallory, body, reason, names)
            mallory.flush()
            assert worker.alive(), worker.error
            for body in _honest_messages("C"):
                ledger.publish(alice, body, names)
            _wait(_version(config.state_dir, 3), "version 3", worker)
            staging = config.state_dir / "shard-0" / "staging"
            _wait(
                lambda: not list(staging.glob("*.stage")),
                "orphan streams dropped",
                worker,
                UPDATE_TIMEOUT + 30,
            )
            assert worker.alive(), worker.error
    finally:
        nobody.close()
        worker.close()
    elapsed = time.monotonic() - started

    got_dead = Counter(_drain_dead_letters(broker, names))
    by_reason, got_by_reason = _by_reason(ledger.dead), _by_reason(got_dead)
    print(
        f"\nconsumer fuzz: {ledger.sent} messages in {elapsed:.1f} s; "
        f"{sum(got_dead.values())} dead-lettered, "
        f"{ledger.duplicates} duplicates acked, {ledger.orphan_streams} orphan streams dropped"
    )
    print("  dead letters by reason:", dict(got_by_reason.most_common()))
    assert got_dead == ledger.dead, {"missing": ledger.dead - got_dead, "unexpected": got_dead - ledger.dead}
    assert sum(got_dead.values()) >= 3000
    assert _counter_by_reason(metrics.REJECTED, "aggregator") - rejected0 == by_reason
    assert _counter_by_reason(metrics.DEAD_LETTERED, "aggregator") - dead0 == by_reason
    assert _counter_value(metrics.CHUNKS, role="aggregator", event="duplicate") - dup0 == ledger.duplicates
    assert (
        _counter_value(metrics.UPDATES, role="aggregator", event="dropped_incomplete") - dropped0
        == ledger.orphan_streams
    )
    model = model_of(config.state_dir)
    assert model.keys() == expected.keys()
    for name in expected:
        assert torch.equal(model[name], expected[name]), f"{name} differs from the garbage-free run"
    x0 = small_model()
    for name in x0:  # and the honest updates really were folded (the reference is not just x0)
        want = x0[name] + sum(honest(u)[name] for u in HONEST)
        torch.testing.assert_close(model[name], want, rtol=0, atol=1e-5)
    assert state(config.state_dir)["version"] == 3


# ----------------------------------------------------------------------------------------------------------
# Bugs the fuzzing found in other modules, pinned as strict xfails for the owners
# ----------------------------------------------------------------------------------------------------------


def _publish_all(t: Transport, names: Names, bodies: list[bytes]) -> None:
    for body in bodies:
        t.publish(names.updates_exchange, names.shard_key(0), body)
    t.flush()


def test_a_dead_letter_is_counted_once(tmp_path: Path) -> None:
    broker, names, config = _setup(tmp_path)
    before = _counter_value(metrics.DEAD_LETTERED)
    worker = AggregatorThread(broker, config)
    try:
        with connect(f"memory://mallory@{broker}") as mallory:
            _publish_all(mallory, names, [b"not a fedq message"])
        _wait(lambda: len(_dead_letters_so_far(broker, names)) == 1, "a dead letter", worker, 30)
    finally:
        worker.close()
    assert _counter_value(metrics.DEAD_LETTERED) - before == 1


def _dead_letters_so_far(broker: str, names: Names) -> list[bytes]:
    with named_broker(broker).cond:
        return [m.body for m in named_broker(broker).queues[names.dead_letter_queue].messages]


def test_a_replayed_update_id_is_dead_lettered_and_unstaged(tmp_path: Path) -> None:
    broker, names, config = _setup(tmp_path)
    worker = AggregatorThread(broker, config)
    replay = list(
        iter_container(
            honest("A"),
            stream="replay/A",
            meta={"update_id": "A", "base_version": 1, "kind": "delta", "num_samples": 1},
            chunk_bytes=4096,
        )
    )
    staging = config.state_dir / "shard-0" / "staging"
    try:
        with connect(f"memory://alice@{broker}") as alice:
            _publish_all(alice, names, _honest_messages("A"))
            _wait(_version(config.state_dir, 1), "version 1", worker)
            _publish_all(alice, names, replay)
        queue = named_broker(broker).queues[names.updates_queue(0)]
        _wait(lambda: not queue.messages, "the replay consumed", worker, 30)
        time.sleep(1.0)  # the last delivery is being handled
    finally:
        worker.close()
    assert _dead_letters_so_far(broker, names) == [replay[-1]]
    assert not list(staging.glob("*.stage"))

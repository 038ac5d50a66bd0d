"""The fedq message format: a fixed preamble, a msgpack header, a payload. Spec: fedq/docs/wire-format.md.

Every message that crosses the broker is untrusted until ``decode`` has checked it. Decoding validates the
whole header (exact field set, types, bounds) and the payload size and checksum *before* anything is allocated
from a declared size, so a hostile or corrupt message costs at most its own length in memory and raises
``WireError``.
"""

from __future__ import annotations

import contextlib
import math
import struct
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import lz4.block
import msgpack
import torch

from fedq.codecs import Codec, codec_from_header
from fedq.codecs.base import finite, require
from fedq.errors import CodecError, WireError

MAGIC = b"FEDQ"
VERSION = 1  # chunks, manifests and commits are written as version 1, as before version 2 existed
BATCH_VERSION = 2  # version 2 adds one kind, the batch; a batch is always version 2
_PREAMBLE = struct.Struct(">4sBBH")  # magic, format version, flags (0), header length
PREAMBLE_BYTES = _PREAMBLE.size

CHUNK = "chunk"
MANIFEST = "manifest"
COMMIT = "commit"
BATCH = "batch"
CONTROL_KINDS = (MANIFEST, COMMIT)

# Tensor dtypes a chunk may declare (the dtype of the original tensor, not of the payload).
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# The most elements a batched fold decodes at once (``add_tensors``): 8 MiB of float32 levels, so that K small
# chunks of a window decode together (the demo model's largest: 10 x 102,400) and K large ones never do.
ROWS_ELEMENTS = 1 << 21
# lz4 pays only on redundant bytes (zero-heavy deltas of frozen layers); float and quantized bytes give a
# ratio of 1.00. A 48 KiB probe (three 16 KiB samples) costs ~5-8 us against ~6 ms for a 4 MiB chunk, so a
# payload is compressed whole only when the probe saves at least LZ4_MIN_SAVING, and sent compressed only when
# that holds for the whole payload too. Measurements: fedq/docs/wire-format.md, section "Compression".
LZ4_MIN_SAVING = 0.10
LZ4_MIN_PAYLOAD = 4096
_PROBE_BYTES = 16384


@dataclass(frozen=True)
class Limits:
    """Bounds a decoder enforces before it allocates anything from a declared size."""

    max_header_bytes: int = 0xFFFF
    max_dims: int = 8
    max_elements: int = 1 << 34  # per tensor: 16 Gi elements (Llama-3.1-405B's largest tensor is 2.1 Gi)
    max_chunk_elements: int = 1 << 26  # decoded size of one chunk: 256 MiB of float32
    max_payload_bytes: int = 64 << 20
    max_name_bytes: int = 1024
    max_batch_parts: int = 4096


@dataclass(frozen=True)
class Message:
    """A validated message. Chunk fields are unset on control messages, ``meta`` is empty on chunks."""

    kind: str
    stream: str
    meta: dict[str, Any] = field(default_factory=dict)
    index: int = 0
    name: str = ""
    dtype: torch.dtype = torch.float32
    shape: tuple[int, ...] = ()
    offset: int = 0
    count: int = 0
    codec: Codec | None = None
    codec_meta: dict[str, Any] = field(default_factory=dict)
    # the bytes as received; the aggregator's GPU fold swaps in their copy on the device
    payload: memoryview | torch.Tensor = field(default_factory=lambda: memoryview(b""))
    wire_bytes: int = 0


def encode_chunk(
    *,
    stream: str,
    index: int,
    name: str,
    dtype: torch.dtype,
    shape: tuple[int, ...] | list[int] | torch.Size,
    offset: int,
    count: int,
    codec: Codec,
    x: torch.Tensor,
) -> bytes:
    """Encode ``x``, elements ``offset .. offset+count`` of the flattened tensor, as one chunk message."""
    if x.numel() != count:
        raise WireError(
            f"chunk of {name!r} has {x.numel()} elements, header says {count}", reason="length_mismatch"
        )
    codec_meta, raw = codec.encode(x.reshape(-1))
    return frame_chunk(
        stream=stream,
        index=index,
        name=name,
        dtype=dtype,
        shape=shape,
        offset=offset,
        count=count,
        codec=codec,
        codec_meta=codec_meta,
        raw=raw,
    )


def frame_chunk(
    *,
    stream: str,
    index: int,
    name: str,
    dtype: torch.dtype,
    shape: tuple[int, ...] | list[int] | torch.Size,
    offset: int,
    count: int,
    codec: Codec,
    codec_meta: dict[str, Any],
    raw: bytes | bytearray | memoryview,
) -> bytes:
    """Frame a slice the caller has already encoded (error feedback needs the payload before it is sent)."""
    raw = memoryview(raw).cast("B")
    if len(raw) != codec.payload_nbytes(count):
        raise WireError(
            f"{codec.name} payload of {len(raw)} bytes for {count} elements", reason="length_mismatch"
        )
    payload, compressed = _maybe_lz4(raw)
    header = {
        "kind": CHUNK,
        "stream": stream,
        "index": index,
        "name": name,
        "dtype": DTYPE_NAMES[dtype],
        "shape": [int(d) for d in shape],
        "offset": offset,
        "count": count,
        "codec": codec.name,
        "params": codec.config(),
        "meta": codec_meta,
        "lz4": compressed,
        "raw_len": len(raw),
        "len": len(payload),
        "crc32": zlib.crc32(payload),
    }
    return _frame(header, payload)


def encode_control(kind: str, stream: str, meta: dict[str, Any]) -> bytes:
    """Encode a manifest or commit: a header only, its ``meta`` defined by fedq.streaming."""
    if kind not in CONTROL_KINDS:
        raise WireError(f"unknown control kind {kind!r}; expected one of {CONTROL_KINDS}", reason="bad_kind")
    return _frame({"kind": kind, "stream": stream, "meta": meta}, b"")


def encode_batch(stream: str, parts: list[bytes]) -> bytes:
    """Pack several messages of one stream into one body (format version 2): a small update's tensors then
    cost the broker, the transports and the receiver one message instead of one each."""
    if not parts:
        raise WireError("a batch needs at least one message", reason="bad_header")
    header = {"kind": BATCH, "stream": stream, "lens": [len(p) for p in parts]}
    return _frame(header, b"".join(parts), BATCH_VERSION)


def _frame(header: dict[str, Any], payload: bytes | memoryview, version: int = VERSION) -> bytes:
    packed = msgpack.packb(header, use_bin_type=True)
    if len(packed) > 0xFFFF:
        raise WireError(f"header of {len(packed)} bytes exceeds the 65535-byte limit", reason="too_large")
    return b"".join((_PREAMBLE.pack(MAGIC, version, 0, len(packed)), packed, payload))


def _maybe_lz4(raw: memoryview) -> tuple[memoryview, bool]:
    """Compress only where the probe predicts a saving; never compress incompressible float bytes whole."""
    n = len(raw)
    if n < LZ4_MIN_PAYLOAD:
        return raw, False
    if n > 3 * _PROBE_BYTES:
        mid = n // 2
        probe = b"".join((raw[:_PROBE_BYTES], raw[mid : mid + _PROBE_BYTES], raw[n - _PROBE_BYTES :]))
        if len(lz4.block.compress(probe, store_size=False)) > (1 - LZ4_MIN_SAVING) * len(probe):
            return raw, False
    packed = lz4.block.compress(raw, store_size=False)
    if len(packed) > (1 - LZ4_MIN_SAVING) * n:
        return raw, False
    return memoryview(packed), True


def decode(data: bytes | bytearray | memoryview, limits: Limits = Limits()) -> Message:
    """Parse and validate one message; raise ``WireError`` (with a reason slug) for anything malformed.

    A batch is not one message: ``decode_all`` reads it (here it is ``bad_kind``)."""
    view = memoryview(data).cast("B")
    version, header, payload = _open(view, limits)
    kind = header.get("kind")
    if version == BATCH_VERSION and kind != BATCH:
        raise WireError(f"a version-2 message must be a batch, not {kind!r}", reason="version")
    if kind in CONTROL_KINDS:
        return _control(header, payload, limits, len(view))
    if kind == CHUNK:
        return _chunk(header, payload, limits, len(view))
    raise WireError(f"unknown message kind {kind!r}", reason="bad_kind")


def decode_all(
    data: bytes | bytearray | memoryview, limits: Limits = Limits()
) -> list[tuple[Message, memoryview]]:
    """The messages one body carries, each validated, with its own bytes: the message itself, or a batch's
    parts. A batch's parts all belong to the batch's stream and none is a batch; any part that fails makes
    the whole body fail, so a receiver acts on a batch all or nothing."""
    view = memoryview(data).cast("B")
    version, header, payload = _open(view, limits)
    if header.get("kind") != BATCH:
        return [(decode(view, limits), view)]
    if version != BATCH_VERSION:
        raise WireError(f"a batch must be a version-2 message, not version {version}", reason="version")
    _check_fields(header, _BATCH_FIELDS, limits)
    lens = header["lens"]
    if not 0 < len(lens) <= limits.max_batch_parts:
        raise WireError(
            f"a batch of {len(lens)} messages; expected 1 to {limits.max_batch_parts}", reason="bad_header"
        )
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in lens):
        raise WireError("batch lens must be non-negative integers", reason="bad_header")
    if sum(lens) != len(payload):
        raise WireError(
            f"batch payload is {len(payload)} bytes, its lens add up to {sum(lens)}", reason="length_mismatch"
        )
    out, start = [], 0
    for n in lens:
        part = payload[start : start + n]
        start += n
        msg = decode(part, limits)
        if msg.stream != header["stream"]:
            what = f"batch of stream {header['stream']!r} carries a message of {msg.stream!r}"
            raise WireError(what, reason="bad_header")
        out.append((msg, part))
    return out


def _open(view: memoryview, limits: Limits) -> tuple[int, dict[str, Any], memoryview]:
    """The preamble and header checked: (format version, header, payload)."""
    if len(view) < PREAMBLE_BYTES:
        raise WireError(f"message of {len(view)} bytes is shorter than the preamble", reason="truncated")
    magic, version, flags, header_len = _PREAMBLE.unpack_from(view)
    if magic != MAGIC:
        raise WireError(f"bad magic {bytes(magic)!r}; not a fedq message", reason="bad_magic")
    if version not in (VERSION, BATCH_VERSION):
        raise WireError(
            f"unknown format version {version}; this decoder reads versions {VERSION} and {BATCH_VERSION}",
            reason="version",
        )
    if flags != 0:
        raise WireError(f"unknown flags {flags:#04x} in a version-{version} message", reason="bad_flags")
    if header_len > limits.max_header_bytes:
        raise WireError(
            f"header of {header_len} bytes exceeds the limit {limits.max_header_bytes}", reason="too_large"
        )
    end = PREAMBLE_BYTES + header_len
    if len(view) < end:
        raise WireError(f"message truncated inside its {header_len}-byte header", reason="truncated")
    return version, _unpack_header(view[PREAMBLE_BYTES:end]), view[end:]


def _unpack_header(raw: memoryview) -> dict[str, Any]:
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types for corrupt input
        raise WireError(f"header is not valid msgpack: {exc}", reason="bad_header") from None
    if not isinstance(header, dict):
        raise WireError(f"header must be a map, got {type(header).__name__}", reason="bad_header")
    return header


_CONTROL_FIELDS = {"kind": str, "stream": str, "meta": dict}
_BATCH_FIELDS = {"kind": str, "stream": str, "lens": list}
_CHUNK_FIELDS = {
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


def _check_fields(header: dict[str, Any], expected: Mapping[str, type], limits: Limits) -> None:
    """Exactly the expected keys, each of its type (bool is not an int), strings and ints bounded. A dict,
    list or bool of exactly its type (what msgpack gives) needs no more: this runs for every message part."""
    if header.keys() != expected.keys():
        missing, extra = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
        raise WireError(f"header fields wrong: missing {missing}, unexpected {extra}", reason="bad_header")
    for key, typ in expected.items():
        value = header[key]
        if type(value) is typ and typ is not int and typ is not str:
            continue
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise WireError(
                f"header field {key!r} must be {typ.__name__}, got {value!r:.80}", reason="bad_header"
            )
        if isinstance(value, int) and not 0 <= value < 1 << 63:
            raise WireError(f"header field {key!r} out of range: {value}", reason="bad_header")
        if isinstance(value, str) and (not value or len(value.encode()) > limits.max_name_bytes):
            raise WireError(
                f"header field {key!r} empty or longer than {limits.max_name_bytes}", reason="bad_header"
            )


def _control(header: dict[str, Any], payload: memoryview, limits: Limits, wire_bytes: int) -> Message:
    _check_fields(header, _CONTROL_FIELDS, limits)
    if len(payload):
        raise WireError(
            f"{header['kind']} carries {len(payload)} payload bytes; expected none", reason="length_mismatch"
        )
    return Message(kind=header["kind"], stream=header["stream"], meta=header["meta"], wire_bytes=wire_bytes)


def _chunk(header: dict[str, Any], payload: memoryview, limits: Limits, wire_bytes: int) -> Message:
    _check_fields(header, _CHUNK_FIELDS, limits)
    shape = _shape(header["shape"], limits)
    numel = 1
    for d in shape:
        numel *= d
    if numel > limits.max_elements:
        raise WireError(
            f"tensor of {numel} elements exceeds the limit {limits.max_elements}", reason="too_large"
        )
    if header["dtype"] not in DTYPES:
        raise WireError(
            f"unknown dtype {header['dtype']!r}; expected one of {sorted(DTYPES)}", reason="bad_header"
        )
    offset, count = header["offset"], header["count"]
    if count > limits.max_chunk_elements:
        raise WireError(
            f"chunk of {count} elements exceeds the limit {limits.max_chunk_elements}", reason="too_large"
        )
    if offset + count > numel:
        raise WireError(
            f"slice {offset}+{count} exceeds the {numel} elements of {shape}", reason="length_mismatch"
        )
    if not all(isinstance(k, str) for k in header["params"]) or not all(
        isinstance(k, str) for k in header["meta"]
    ):
        raise WireError("codec params and meta must be maps with string keys", reason="bad_header")
    try:
        codec = codec_from_header(header["codec"], header["params"])
    except CodecError as exc:
        raise WireError(f"codec: {exc}", reason="unknown_codec") from None
    if offset % codec.alignment or (count % codec.alignment and offset + count != numel):
        raise WireError(
            f"slice {offset}+{count} not aligned to {codec.alignment} for {codec.name}", reason="bad_header"
        )
    raw_len, sent_len = header["raw_len"], header["len"]
    if raw_len > limits.max_payload_bytes:
        raise WireError(
            f"payload of {raw_len} bytes exceeds the limit {limits.max_payload_bytes}", reason="too_large"
        )
    if raw_len != codec.payload_nbytes(count):
        raise WireError(
            f"{codec.name} payload of {count} elements is {codec.payload_nbytes(count)} bytes, not {raw_len}",
            reason="length_mismatch",
        )
    if sent_len != len(payload):
        raise WireError(f"payload is {len(payload)} bytes, header says {sent_len}", reason="length_mismatch")
    if header["lz4"] and sent_len >= raw_len:
        raise WireError(
            f"lz4 payload of {sent_len} bytes is not smaller than {raw_len}", reason="length_mismatch"
        )
    if header["lz4"] and raw_len > lz4_max_raw_len(sent_len):
        # checked before decompressing: the decompressor allocates the declared size up front
        raise WireError(
            f"lz4 payload of {sent_len} bytes cannot decompress to {raw_len} bytes", reason="length_mismatch"
        )
    if not header["lz4"] and sent_len != raw_len:
        raise WireError(
            f"uncompressed payload is {sent_len} bytes, header says {raw_len}", reason="length_mismatch"
        )
    if zlib.crc32(payload) != header["crc32"]:
        raise WireError("payload checksum mismatch (crc32)", reason="checksum")
    if header["lz4"]:
        payload = _unlz4(payload, raw_len)
    return Message(
        kind=CHUNK,
        stream=header["stream"],
        index=header["index"],
        name=header["name"],
        dtype=DTYPES[header["dtype"]],
        shape=shape,
        offset=offset,
        count=count,
        codec=codec,
        codec_meta=header["meta"],
        payload=payload,
        wire_bytes=wire_bytes,
    )


def _shape(dims: list[Any], limits: Limits) -> tuple[int, ...]:
    if len(dims) > limits.max_dims:
        raise WireError(f"{len(dims)} dimensions exceed the limit {limits.max_dims}", reason="too_large")
    for d in dims:
        if not isinstance(d, int) or isinstance(d, bool) or not 0 <= d <= limits.max_elements:
            raise WireError(f"bad dimension {d!r} in shape {dims!r:.200}", reason="too_large")
    return tuple(dims)


def lz4_max_raw_len(compressed_len: int) -> int:
    """The most bytes an lz4 block of ``compressed_len`` bytes can decompress to (lz4's maximum ratio is 255:1
    plus a few bytes of literals), so a declared size above it is a lie and is refused without allocating."""
    return 255 * compressed_len + 64


def _unlz4(payload: memoryview, raw_len: int) -> memoryview:
    """Decompress into at most ``raw_len`` bytes (already checked against the limits and the lz4 ratio)."""
    try:
        out = lz4.block.decompress(payload, uncompressed_size=raw_len)
    except lz4.block.LZ4BlockError as exc:
        raise WireError(f"lz4 payload is corrupt: {exc}", reason="lz4") from None
    if len(out) != raw_len:
        raise WireError(
            f"lz4 payload decompressed to {len(out)} bytes, header says {raw_len}", reason="length_mismatch"
        )
    return memoryview(out)


def decode_tensor(msg: Message, device: torch.device | str = "cpu") -> torch.Tensor:
    """The chunk as a 1-D float32 tensor on ``device``; NaN/Inf are refused (reason ``nonfinite``)."""
    with _chunk_codec(msg) as codec:
        x = codec.decode(msg.codec_meta, msg.payload, msg.count, torch.device(device))
        if x.shape != (msg.count,) or x.dtype != torch.float32:
            got = f"{tuple(x.shape)} {x.dtype}"
            raise WireError(f"codec returned {got} for {msg.count} elements", reason="length_mismatch")
        require(finite(x), lambda: CodecError(str(_nonfinite(msg)), reason="nonfinite"))
    return x


def decode_part(msg: Message, lo: int, hi: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Elements ``lo .. hi`` of ``decode_tensor(msg)``, decoding only what holds them where the codec can
    (``Codec.decode_part``); the same errors, for NaN/Inf within the part."""
    with _chunk_codec(msg) as codec:
        x = codec.decode_part(msg.codec_meta, msg.payload, msg.count, lo, hi, torch.device(device))
        if x.shape != (hi - lo,) or x.dtype != torch.float32:
            got = f"{tuple(x.shape)} {x.dtype}"
            raise WireError(f"codec returned {got} for {hi - lo} elements", reason="length_mismatch")
        require(finite(x), lambda: CodecError(str(_nonfinite(msg)), reason="nonfinite"))
    return x


def add_tensor(msg: Message, out: torch.Tensor, alpha: float) -> None:
    """``out += alpha * decode_tensor(msg)`` without the decoded copy (``Codec.decode_add``); the errors of
    ``decode_tensor``, raised before ``out`` changes, so a refused chunk never reaches a sum."""
    with _chunk_codec(msg) as codec:
        codec.decode_add(msg.codec_meta, msg.payload, msg.count, out, alpha)


def add_tensors(msgs: Sequence[Message], out: torch.Tensor, alphas: Sequence[float]) -> None:
    """``add_tensor(msgs[i], out, alphas[i])`` for each in turn: chunks of one slice (K updates' chunks over
    one fold window), decoded together where their codec can (``Codec.decode_add_rows``: the same sum, bit
    for bit), at most ``ROWS_ELEMENTS`` decoded elements at a time. Otherwise, and when one of them fails a
    check, one by one: the errors are ``add_tensor``'s, naming the chunk at fault."""
    first = msgs[0] if msgs else None
    if first is None or first.codec is None or any(_other_rows(m, first) for m in msgs):
        for msg, alpha in zip(msgs, alphas, strict=True):
            add_tensor(msg, out, alpha)
        return
    step = max(1, ROWS_ELEMENTS // max(1, first.count))
    for lo in range(0, len(msgs), step):
        part, factors = msgs[lo : lo + step], list(alphas[lo : lo + step])
        if len(part) < 2 or not first.codec.decode_add_rows(
            [(m.codec_meta, m.payload) for m in part], first.count, out, factors
        ):
            for msg, alpha in zip(part, factors, strict=True):
                add_tensor(msg, out, alpha)


def _other_rows(msg: Message, first: Message) -> bool:
    """Whether ``msg`` cannot be decoded in one batch with ``first``: another kind, codec or size."""
    return msg.kind != CHUNK or msg.count != first.count or msg.codec != first.codec


def check_chunks(msgs: Sequence[Message], device: torch.device | str = "cpu") -> list[WireError | None]:
    """``check_chunk`` of each message (its ``WireError``, or None), the chunks of one codec checked together
    (``Codec.check_rows``: a delivery of small chunks costs one op sequence per codec instead of one per
    chunk); where a group may hold a bad chunk, each of its chunks is checked alone, so every verdict and
    error is the one ``check_chunk`` gives."""
    groups: dict[Codec | None, list[int]] = {}
    for i, msg in enumerate(msgs):
        groups.setdefault(msg.codec if msg.kind == CHUNK else None, []).append(i)
    errors: list[WireError | None] = [None] * len(msgs)
    for codec, members in groups.items():
        chunks = [(msgs[i].codec_meta, msgs[i].payload, msgs[i].count) for i in members]
        if codec is not None and codec.check_rows(chunks, torch.device(device)):
            continue
        for i in members:
            try:
                check_chunk(msgs[i], device)
            except WireError as exc:
                errors[i] = exc
    return errors


def chunk_sq_norm(msg: Message, device: torch.device | str = "cpu") -> float:
    """Σ x² of the chunk's values (``Codec.sq_norm``, without a full decode where the codec allows), with
    ``decode_tensor``'s errors: a payload the codec refuses (``codec``), NaN or Inf (``nonfinite``)."""
    with _chunk_codec(msg) as codec:
        total = codec.sq_norm(msg.codec_meta, msg.payload, msg.count, torch.device(device))
    if not math.isfinite(total):
        raise _nonfinite(msg)
    return total


def check_chunk(msg: Message, device: torch.device | str = "cpu") -> None:
    """Refuse a chunk that ``decode_tensor`` would refuse (``codec``, ``nonfinite``), as cheaply as its codec
    can tell (``Codec.check``: quantized codecs look at their scales alone)."""
    with _chunk_codec(msg) as codec:
        codec.check(msg.codec_meta, msg.payload, msg.count, torch.device(device))


@contextlib.contextmanager
def _chunk_codec(msg: Message) -> Iterator[Codec]:
    """The codec of a chunk message, its ``CodecError``s raised as ``WireError``s: ``nonfinite`` for NaN/Inf
    values, ``codec`` for anything else it refuses."""
    if msg.kind != CHUNK or msg.codec is None:
        raise WireError(f"a {msg.kind} message carries no tensor", reason="bad_kind")
    try:
        yield msg.codec
    except CodecError as exc:
        if exc.reason == "nonfinite":
            raise _nonfinite(msg) from None
        raise WireError(f"{msg.codec.name} payload of {msg.name!r}: {exc}", reason="codec") from None


def _nonfinite(msg: Message) -> WireError:
    return WireError(f"chunk {msg.index} of {msg.name!r} contains NaN or Inf", reason="nonfinite")

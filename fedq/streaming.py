"""Container streams: a mapping of tensors (a state dict, a safetensors file) <-> manifest, chunks, commit.

The sender is a lazy generator: chunk k+E is sliced and encoded only when the transport has taken chunk k (E
encoder threads, as many as the caller's torch threads, at most the cores), so the extra memory of a send is
the transport's in-flight window and E chunks, never a second copy of the model. Consecutive tensors of one
chunk each, as many as one chunk's payload holds, are encoded together (``fedq.codecs.batch``: the same
bytes, one op sequence instead of one per tensor). The receiver accepts the
messages of any number of streams in any order, duplicated, chunks before their manifest, and treats a stream
as complete only with its manifest, every chunk and its commit. The message layout is in
fedq/docs/wire-format.md (section "Streaming").
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import functools
import gc
import itertools
import math
import time
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedq import wire
from fedq.codecs import Codec, ErrorFeedback, get_codec
from fedq.codecs.base import deferring, zeros
from fedq.codecs.batch import Layout, buffer, flat_buffer, payload_spans, release
from fedq.device import to_host
from fedq.errors import StreamError, WireError
from fedq.metrics import CHUNKS, FP32_BYTES, WIRE_BYTES, current_rss_bytes
from fedq.safetensors import SafetensorsReader, SafetensorsWriter, TensorSpec
from fedq.threads import cpu_workers, ordered_map
from fedq.topology import DEFAULT_CHUNK_BYTES, DEFAULT_TIMEOUT
from fedq.transport.base import Delivery, Transport
from fedq.units import human_bytes

CodecFor = Callable[[str, torch.Tensor], Codec]
RESERVED_META = ("tensors", "chunks")
_LIMITS = wire.Limits()
# Chunks that arrive before their manifest are held (decoded later). Senders send the manifest first, so only
# redeliveries get here; this bounds what a stream without a manifest can make a receiver hold.
MAX_EARLY_BYTES = 256 << 20


def fp32_everywhere(name: str, tensor: torch.Tensor) -> Codec:
    """The lossless default: every tensor in fp32."""
    return get_codec("fp32")


# Manifest ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a container: chunk ``first + j`` covers elements ``j*chunk_elements ..`` of it."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    codec: str
    chunks: int
    chunk_elements: int
    first: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def slice_of(self, index: int) -> tuple[int, int]:
        """(offset, count) of chunk ``index`` of the stream, which must belong to this tensor."""
        offset = (index - self.first) * self.chunk_elements
        return offset, min(self.chunk_elements, self.numel - offset)


@dataclass(frozen=True)
class Manifest:
    stream: str
    tensors: tuple[TensorEntry, ...]
    chunks: int
    meta: dict[str, Any]

    @functools.cached_property
    def _firsts(self) -> list[int]:
        return [t.first for t in self.tensors]

    def entry_for(self, index: int) -> TensorEntry:
        return self.tensors[bisect.bisect_right(self._firsts, index) - 1]

    def to_meta(self) -> dict[str, Any]:
        rows = [
            [t.name, wire.DTYPE_NAMES[t.dtype], list(t.shape), t.codec, t.chunks, t.chunk_elements]
            for t in self.tensors
        ]
        return {"tensors": rows, "chunks": self.chunks, **self.meta}

    def specs(self) -> dict[str, TensorSpec]:
        return {t.name: TensorSpec(t.dtype, t.shape) for t in self.tensors}

    @property
    def fp32_bytes(self) -> int:
        return 4 * sum(t.numel for t in self.tensors)

    @classmethod
    def from_message(cls, msg: wire.Message, limits: wire.Limits = _LIMITS) -> Manifest:
        """Validate an untrusted manifest: every entry well typed, chunk counts consistent with the sizes."""
        rows, total = msg.meta.get("tensors"), msg.meta.get("chunks")
        if not isinstance(rows, list) or not isinstance(total, int):
            raise _bad_manifest(msg.stream, "needs a list 'tensors' and an int 'chunks'")
        entries: list[TensorEntry] = []
        first = 0
        for row in rows:
            entry = _entry(msg.stream, row, first, limits)
            entries.append(entry)
            first += entry.chunks
        if first != total or len({e.name for e in entries}) != len(entries):
            raise _bad_manifest(
                msg.stream, f"{first} chunks listed, {total} declared, or a tensor named twice"
            )
        meta = {k: v for k, v in msg.meta.items() if k not in RESERVED_META}
        return cls(msg.stream, tuple(entries), total, meta)


def _bad_manifest(stream: str, why: str) -> StreamError:
    return StreamError(f"stream {stream}: bad manifest: {why}", reason="bad_manifest")


def _entry(stream: str, row: Any, first: int, limits: wire.Limits) -> TensorEntry:
    if not (isinstance(row, list) and len(row) == 6):
        raise _bad_manifest(
            stream, f"entry {row!r:.100} is not [name, dtype, shape, codec, chunks, chunk_elements]"
        )
    name, dtype, shape, codec, chunks, chunk_elements = row
    ints = [chunks, chunk_elements, *(shape if isinstance(shape, list) else [])]
    if (
        not isinstance(name, str)
        or dtype not in wire.DTYPES
        or not isinstance(shape, list)
        or len(shape) > limits.max_dims
        or not isinstance(codec, str)
        or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i <= limits.max_elements for i in ints
        )
    ):
        raise _bad_manifest(stream, f"entry {row!r:.100} has a wrong type or an out-of-range size")
    entry = TensorEntry(name, wire.DTYPES[dtype], tuple(shape), codec, chunks, chunk_elements, first)
    if (
        chunk_elements < 1
        or entry.numel > limits.max_elements
        or chunks != _chunk_count(entry.numel, chunk_elements)
    ):
        raise _bad_manifest(
            stream, f"{name}: {chunks} chunks of {chunk_elements} do not cover {entry.numel} elements"
        )
    return entry


def _chunk_count(numel: int, chunk_elements: int) -> int:
    return max(1, -(-numel // chunk_elements))


def chunk_elements_for(codec: Codec, chunk_bytes: int) -> int:
    """The largest multiple of the codec's alignment whose payload fits ``chunk_bytes`` (at least one)."""
    unit = codec.alignment
    return max(1, chunk_bytes // codec.payload_nbytes(unit)) * unit


class LazyTensors(Mapping[str, torch.Tensor]):
    """A mapping whose values are computed when read (a client's deltas), so that a container is materialised
    one tensor at a time. ``spec(name)`` gives a value's shape and dtype without computing it (a tensor on the
    meta device, or the value itself where it is at hand): all that ``plan`` reads, so each value is computed
    once, when the chunker reaches it (for a delta: one read of the base from disk, one subtraction).

    ``slicer(name)``, where given, returns ``piece(offset, count)``: elements ``offset .. offset+count`` of
    the flattened value, computed alone. The chunker then computes one chunk at a time, never a whole value:
    a whole delta of Llama-3.2-1B's embedding is 1 GB of float32 (and a bf16 model's subtraction made a
    second one).
    """

    def __init__(
        self,
        names: list[str],
        compute: Callable[[str], torch.Tensor],
        spec: Callable[[str], torch.Tensor],
        slicer: Callable[[str], Callable[[int, int], torch.Tensor]] | None = None,
    ) -> None:
        self._names = names
        self._compute = compute
        self.spec = spec
        self.slicer = slicer

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self._compute(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _specs(tensors: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, a tensor with the value's shape and dtype): a lazy value's spec, without computing it."""
    if isinstance(tensors, LazyTensors):
        return ((name, tensors.spec(name)) for name in tensors)
    return iter(tensors.items())


def plan(
    tensors: Mapping[str, torch.Tensor],
    *,
    stream: str,
    meta: Mapping[str, Any],
    codec_for: CodecFor = fp32_everywhere,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> tuple[Manifest, dict[str, Codec]]:
    """The manifest of a container (from shapes and dtypes: no tensor data is read) and the codecs."""
    if clash := [k for k in RESERVED_META if k in meta]:
        raise StreamError(f"meta keys {clash} are reserved for the manifest", reason="bad_manifest")
    entries, codecs, first = [], {}, 0
    for name, t in _specs(tensors):
        codec = codec_for(name, t)
        per_chunk = chunk_elements_for(codec, chunk_bytes)
        dtype = wire.DTYPE_NAMES.get(t.dtype)
        if dtype is None:
            raise StreamError(
                f"{name}: {t.dtype} tensors cannot be streamed (float32/16, bfloat16)", reason="dtype"
            )
        entry = TensorEntry(
            name, t.dtype, tuple(t.shape), codec.name, _chunk_count(t.numel(), per_chunk), per_chunk, first
        )
        entries.append(entry)
        codecs[name] = codec
        first += entry.chunks
    return Manifest(stream, tuple(entries), first, dict(meta)), codecs


# Sending ----------------------------------------------------------------------------------------------------


def iter_container(
    tensors: Mapping[str, torch.Tensor],
    *,
    stream: str,
    meta: Mapping[str, Any],
    codec_for: CodecFor = fp32_everywhere,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    feedback: ErrorFeedback | None = None,
) -> Iterator[bytes]:
    """Manifest, then each chunk encoded only when asked for, then commit."""
    manifest, codecs = plan(tensors, stream=stream, meta=meta, codec_for=codec_for, chunk_bytes=chunk_bytes)
    for body, _ in _messages(tensors, manifest, codecs, feedback, 1, chunk_bytes):
        yield body


def _messages(
    tensors: Mapping[str, torch.Tensor],
    manifest: Manifest,
    codecs: dict[str, Codec],
    feedback: ErrorFeedback | None,
    encoders: int,
    group_bytes: int,
) -> Generator[tuple[bytes, TensorEntry | None], None, None]:
    yield wire.encode_control(wire.MANIFEST, manifest.stream, manifest.to_meta()), None
    encode = functools.partial(_encode, manifest=manifest, codecs=codecs, feedback=feedback)
    work = _work(tensors, manifest, codecs, feedback, encoders, group_bytes)
    with contextlib.closing(ordered_map(encode, work, encoders, "fedq-encode")) as encoded:
        for messages in encoded:
            yield from messages
    yield wire.encode_control(wire.COMMIT, manifest.stream, {"chunks": manifest.chunks}), None


Piece = tuple[TensorEntry, int, torch.Tensor]  # a chunk's entry, its index in the stream, its elements


@dataclass
class _Group:
    """Consecutive small tensors (one chunk each) encoded together: their values in one flat buffer, laid out
    codec after codec (``regions``: each codec's slices, in ``entries`` order), zero between the slices."""

    entries: list[TensorEntry]
    pieces: list[torch.Tensor]  # the chunks as they came (error feedback compensates them as they are)
    flat: torch.Tensor
    layout: Layout
    regions: list[tuple[Codec, int, int]]


def _work(
    tensors: Mapping[str, torch.Tensor],
    manifest: Manifest,
    codecs: dict[str, Codec],
    feedback: ErrorFeedback | None,
    held: int,
    group_bytes: int,
) -> Iterator[Piece | _Group]:
    """The stream's chunks as the encoders take them: a large tensor's a chunk at a time, as before; runs of
    consecutive one-chunk tensors (whose payloads fit ``group_bytes`` together) as groups, encoded in one
    op sequence per codec (``fedq.codecs.batch``): per-call overhead, not arithmetic, was most of the cost of
    a model of small tensors (the demo's update: 19 ms of CPU with error feedback, ~5 of it arithmetic)."""
    pieces = _pieces(tensors, manifest, held)
    runs = list(_runs(manifest, codecs, group_bytes))
    reused = isinstance(tensors, SafetensorsReader)  # its slices live in buffers reused a few slices later
    exposed = _exposed(runs, held) if reused else frozenset()
    at = 0
    for run in runs:
        if len(run) == 1:
            for position, (entry, index, piece) in enumerate(itertools.islice(pieces, run[0].chunks), at):
                yield entry, index, piece.clone() if position in exposed else piece
            at += run[0].chunks
            continue
        taken = []
        for entry, index, piece in itertools.islice(pieces, len(run)):
            taken.append((entry, index, piece.clone() if reused else piece))
        at += len(run)
        for same in _same_device(taken):
            yield same[0] if len(same) == 1 else _group(same, codecs, feedback)


def _exposed(runs: list[list[TensorEntry]], held: int) -> frozenset[int]:
    """Stream positions of the chunks that a group's reads would overwrite while an encoder still holds them.

    A file's slice stays valid until ``held`` more are read (``SafetensorsReader.stream``), and ``held`` is
    the encoders' count: one chunk at a time, the ones waiting for an encoder are always among the last
    ``held``. A group reads all its slices at once (and copies them), while the ``held - 1`` chunks before it
    may still wait: those are copied too. Found as a late joiner's snapshot whose last row of an embedding
    held another tensor's values, one run in a few with two encoders."""
    out: set[int] = set()
    at = 0
    for run in runs:
        if len(run) > 1:
            out.update(range(max(0, at - held + 1), at))
        at += run[0].chunks if len(run) == 1 else len(run)
    return frozenset(out)


def _runs(manifest: Manifest, codecs: dict[str, Codec], budget: int) -> Iterator[list[TensorEntry]]:
    """Entries in stream order, consecutive one-chunk ones together while their payloads fit ``budget``.

    A group then holds no more elements than one full chunk of its codec (a payload of ``budget`` bytes), so
    its float32 buffers are no larger than those of a full chunk, which a large model's send holds anyway
    (by this bound; a large model's peak was not measured again with groups)."""
    run: list[TensorEntry] = []
    size = 0
    for entry in manifest.tensors:
        nbytes = codecs[entry.name].payload_nbytes(entry.numel)
        if run and (entry.chunks > 1 or size + nbytes > budget):
            yield run
            run, size = [], 0
        run.append(entry)
        size += nbytes
        if entry.chunks > 1:
            yield run
            run, size = [], 0
    if run:
        yield run


def _same_device(pieces: list[Piece]) -> Iterator[list[Piece]]:
    """Consecutive pieces on one device (a batch encodes where its buffer is)."""
    for _, same in itertools.groupby(pieces, key=lambda p: p[2].device):
        yield list(same)


def _group(pieces: list[Piece], codecs: dict[str, Codec], feedback: ErrorFeedback | None) -> _Group:
    """The pieces copied into one float32 buffer, grouped by codec (what every codec's encode computes in
    first: exact), each slice starting at a multiple of every block involved."""
    ordered = sorted(pieces, key=lambda p: codecs[p[0].name].name)  # stable: stream order within a codec
    units = [codecs[e.name].batch_unit for e, _, _ in ordered] + [feedback.batch_unit if feedback else 1]
    layout = Layout(tuple(p.numel() for _, _, p in ordered), max(units))
    flat = flat_buffer(layout, ordered[0][2].device)
    for view, (_, _, piece) in zip(layout.views(flat), ordered, strict=True):
        view.copy_(piece.reshape(-1))
    regions = []
    for _, same in itertools.groupby(enumerate(ordered), key=lambda p: codecs[p[1][0].name]):
        members = [i for i, _ in same]
        regions.append((codecs[ordered[members[0]][0].name], members[0], members[-1] + 1))
    return _Group([e for e, _, _ in ordered], [p for _, _, p in ordered], flat, layout, regions)


def _encode(
    work: Piece | _Group,
    *,
    manifest: Manifest,
    codecs: dict[str, Codec],
    feedback: ErrorFeedback | None,
) -> list[tuple[bytes, TensorEntry]]:
    if isinstance(work, _Group):
        return _encode_group(work, manifest=manifest, feedback=feedback)
    return [_encode_chunk(work, manifest=manifest, codecs=codecs, feedback=feedback)]


def _encode_group(
    group: _Group, *, manifest: Manifest, feedback: ErrorFeedback | None
) -> list[tuple[bytes, TensorEntry]]:
    """A group's messages in stream order: the same steps as ``_encode_chunk`` (compensate, encode, copy to
    the host with the checks, decode, update the residuals, frame), each one batch for the whole group."""
    keys = [(entry.name, 0) for entry in group.entries]  # one chunk each: at offset 0
    layout = group.layout
    if feedback is not None:
        feedback.compensate_batch(keys, group.pieces, group.flat, layout)
    group.pieces.clear()
    parts = [(codec, lo, hi, *layout.part(lo, hi)) for codec, lo, hi in group.regions]
    with deferring() as checks:
        encoded = [codec.encode_batch(group.flat[a:b], part) for codec, _, _, a, b, part in parts]
        flags = checks.flags()
        copies = [to_host(blob, flags if i == 0 else None) for i, (_, blob) in enumerate(encoded)]
        decoded = None
        if feedback is not None:
            decoded = buffer(layout.total, group.flat.device)
            for (codec, _, _, a, b, part), (metas, blob) in zip(parts, encoded, strict=True):
                codec.decode_batch(metas, blob, part, decoded[a:b])
    host = [copy.wait() for copy in copies]
    checks.raise_failed(host[0][1])  # before the residuals change: a refused group leaves them as they were
    if feedback is not None and decoded is not None:
        feedback.update_batch(keys, group.flat, decoded, layout)
    bodies: list[tuple[bytes, TensorEntry]] = []
    for (codec, lo, hi, _, _, part), (metas, _), (raw, _) in zip(parts, encoded, host, strict=True):
        spans = payload_spans([codec.payload_nbytes(n) for n in part.counts])
        for entry, meta, (a, b) in zip(group.entries[lo:hi], metas, spans, strict=True):
            body = wire.frame_chunk(
                stream=manifest.stream,
                index=entry.first,
                name=entry.name,
                dtype=entry.dtype,
                shape=entry.shape,
                offset=0,
                count=entry.numel,
                codec=codec,
                codec_meta=meta,
                raw=raw[a:b],
            )
            bodies.append((body, entry))
    release(group.flat)
    if decoded is not None:
        release(decoded)
    return sorted(bodies, key=lambda m: m[1].first)


def _encode_chunk(
    item: Piece,
    *,
    manifest: Manifest,
    codecs: dict[str, Codec],
    feedback: ErrorFeedback | None,
) -> tuple[bytes, TensorEntry]:
    """One chunk's message. Chunks of a stream touch disjoint state (their own residual slice), so several
    can be encoded at once."""
    entry, index, piece = item
    codec = codecs[entry.name]
    offset, count = entry.slice_of(index)
    if feedback is not None:
        piece = feedback.compensate(entry.name, piece, offset)
    with deferring() as checks:
        codec_meta, payload = codec.encode_on_device(piece)
        # only the payload crosses to the host, with the encode's checks (a GPU: pinned, on the copy stream)
        copy = to_host(payload, checks.flags())
        # the residual is what the receiver's decode will not reproduce: decoded where the tensor is, from the
        # payload still there, while the bytes cross
        decoded = None if feedback is None else codec.decode(codec_meta, payload, count, piece.device)
    raw, flags = copy.wait()
    checks.raise_failed(flags)  # before the residual changes: a refused chunk leaves it as it was
    if feedback is not None and decoded is not None:
        feedback.update(entry.name, piece, decoded, offset)
    body = wire.frame_chunk(
        stream=manifest.stream,
        index=index,
        name=entry.name,
        dtype=entry.dtype,
        shape=entry.shape,
        offset=offset,
        count=count,
        codec=codec,
        codec_meta=codec_meta,
        raw=raw,
    )
    return body, entry


def _pieces(tensors: Mapping[str, torch.Tensor], manifest: Manifest, held: int = 1) -> Iterator[Piece]:
    """(entry, chunk index, the chunk's elements) in stream order; a file's slices are read from disk ahead
    of use (``SafetensorsReader.stream``; the caller holds up to ``held`` at once), a lazy value's with a
    slicer are computed a chunk at a time, an in-memory tensor's are views."""
    if isinstance(tensors, SafetensorsReader):
        order = [(e, i) for e in manifest.tensors for i in range(e.first, e.first + e.chunks)]
        slices = [(e.name, *e.slice_of(i)) for e, i in order]
        pieces = tensors.stream(slices, held)
        yield from ((e, i, piece) for (e, i), piece in zip(order, pieces, strict=True))
        return
    slicer = tensors.slicer if isinstance(tensors, LazyTensors) else None
    for entry in manifest.tensors:
        if slicer is not None:
            piece = slicer(entry.name)
            for index in range(entry.first, entry.first + entry.chunks):
                yield entry, index, piece(*entry.slice_of(index))
            continue
        flat = tensors[entry.name].reshape(-1)
        for index in range(entry.first, entry.first + entry.chunks):
            offset, count = entry.slice_of(index)
            yield entry, index, flat[offset : offset + count]


Outgoing = Iterator[tuple[bytes, list[tuple[TensorEntry, int]]]]  # a body, its chunks and their own bytes


def _single(messages: Iterator[tuple[bytes, TensorEntry | None]]) -> Outgoing:
    for body, entry in messages:
        yield body, [] if entry is None else [(entry, len(body))]


def _packed(messages: Iterator[tuple[bytes, TensorEntry | None]], stream: str, limit: int) -> Outgoing:
    """Consecutive messages gathered into batches of at most ``limit`` bytes of parts (and the decoder's
    part limit); a batch of one is sent as its message."""
    max_parts = wire.Limits().max_batch_parts
    parts: list[bytes] = []
    chunks: list[tuple[TensorEntry, int]] = []

    def batch() -> tuple[bytes, list[tuple[TensorEntry, int]]]:
        body = parts[0] if len(parts) == 1 else wire.encode_batch(stream, parts)
        out = body, list(chunks)
        parts.clear()
        chunks.clear()
        return out

    size = 0
    for body, entry in messages:
        if parts and (size + len(body) > limit or len(parts) == max_parts):
            yield batch()
            size = 0
        parts.append(body)
        chunks += [] if entry is None else [(entry, len(body))]
        size += len(body)
    if parts:
        yield batch()


@dataclass
class SendStats:
    wire_bytes: int = 0
    fp32_bytes: int = 0
    chunks: int = 0
    seconds: float = 0.0


def send_container(
    transport: Transport,
    exchange: str,
    routing_key: str,
    tensors: Mapping[str, torch.Tensor],
    *,
    stream: str,
    meta: Mapping[str, Any],
    codec_for: CodecFor = fp32_everywhere,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    feedback: ErrorFeedback | None = None,
    role: str = "client",
    on_message: Callable[[int], None] | None = None,
    encoders: int | None = None,
    pack: bool = False,
) -> SendStats:
    """Publish a container and wait for every confirm; ``on_message(wire_bytes)`` can drive a progress bar.

    ``pack``: consecutive messages that fit ``chunk_bytes`` together travel as one batch (wire format
    version 2), so a small update is one message instead of one per tensor; its receiver must read version 2
    (``wire.decode_all``: the aggregator and ``Receiver`` do). A message that fills a batch alone is sent as
    itself, so a large model's 4 MiB chunks are the same bytes either way.

    ``encoders``: chunks encoded at once, each in a thread at one torch thread (default ``cpu_workers()``:
    the caller's torch thread count, at most the cores and 4).
    Measured on 2 cores shared with the broker and the aggregator, llama-3.2-1b in nf4 with torch on one
    thread: the update reached the aggregator 7.7 s after its encode began with one encoder, 7.1 s with two.
    """
    manifest, codecs = plan(tensors, stream=stream, meta=meta, codec_for=codec_for, chunk_bytes=chunk_bytes)
    stats = SendStats(fp32_bytes=manifest.fp32_bytes)
    start = time.perf_counter()
    workers = cpu_workers() if encoders is None else encoders
    # Closed before anything propagates: encodes still running would otherwise go on writing (error feedback,
    # the aggregator's x̂ file) after the caller has aborted and closed, or reopened, what they write into.
    with contextlib.closing(_messages(tensors, manifest, codecs, feedback, workers, chunk_bytes)) as messages:
        for body, chunks in _packed(messages, stream, chunk_bytes) if pack else _single(messages):
            transport.publish(exchange, routing_key, body)
            stats.wire_bytes += len(body)
            for entry, nbytes in chunks:
                stats.chunks += 1
                WIRE_BYTES.labels(role, "sent", entry.codec).inc(nbytes)
                CHUNKS.labels(role, "published").inc()
            if on_message is not None:
                on_message(len(body))
    transport.flush()
    stats.seconds = time.perf_counter() - start
    for entry in manifest.tensors:
        FP32_BYTES.labels(role, "sent", entry.codec).inc(4 * entry.numel)
    return stats


def shard_of(sizes: Mapping[str, int], shards: int) -> dict[str, int]:
    """Tensors to shards: largest first onto the lightest shard (lowest index on ties), ties by name."""
    if shards < 1:
        raise StreamError(f"shards must be >= 1, got {shards}", reason="shards")
    load = [0] * shards
    out: dict[str, int] = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        shard = min(range(shards), key=lambda i: (load[i], i))
        out[name] = shard
        load[shard] += sizes[name]
    return out


# Receiving --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """An accepted chunk: elements ``offset .. offset+count`` of tensor ``entry.name``, still encoded.

    The consumer decodes it: ``values()`` as a new float32 tensor, or ``add_to`` straight into a destination
    (a tensor being rebuilt, a sum), which skips the decoded copy. Both raise ``WireError`` for a payload
    the codec refuses or NaN/Inf, before anything is written.
    """

    stream: str
    index: int
    entry: TensorEntry
    offset: int
    message: wire.Message
    device: torch.device

    @property
    def count(self) -> int:
        return self.message.count

    def values(self) -> torch.Tensor:
        return wire.decode_tensor(self.message, self.device)

    def add_to(self, out: torch.Tensor, alpha: float = 1.0) -> None:
        """``out += alpha * values()``; ``out`` is float32 with ``count`` elements."""
        wire.add_tensor(self.message, out, alpha)


@dataclass
class _State:
    manifest: Manifest | None = None
    seen: set[int] = field(default_factory=set)
    early: dict[int, wire.Message] = field(default_factory=dict)
    early_bytes: int = 0
    commit: int | None = None
    touched: float = field(default_factory=time.monotonic)

    def missing(self) -> str:
        if self.manifest is None:
            return f"manifest, commit={'yes' if self.commit is not None else 'no'}"
        missing = self.manifest.chunks - len(self.seen)
        return f"{missing} of {self.manifest.chunks} chunks, commit={self.commit is not None}"


class Assembler:
    """Accepts the messages of many streams in any order; returns each new chunk decoded once."""

    def __init__(
        self, *, device: torch.device | str = "cpu", limits: wire.Limits = _LIMITS, role: str = "client"
    ):
        self.device = torch.device(device)
        self.limits = limits
        self.role = role
        self._streams: dict[str, _State] = {}

    def add(self, msg: wire.Message) -> list[Chunk]:
        """Take one validated message; StreamError if it contradicts what its stream already declared."""
        state = self._streams.setdefault(msg.stream, _State())
        state.touched = time.monotonic()
        if msg.kind == wire.MANIFEST:
            return self._manifest(state, Manifest.from_message(msg, self.limits))
        if msg.kind == wire.COMMIT:
            self._commit(state, msg)
            return []
        if state.manifest is None:
            if msg.index not in state.early:
                state.early[msg.index] = msg
                state.early_bytes += msg.payload.nbytes
            if state.early_bytes > MAX_EARLY_BYTES:
                raise StreamError(
                    f"stream {msg.stream}: over {MAX_EARLY_BYTES >> 20} MiB of chunks before its manifest",
                    reason="too_many_chunks",
                )
            return []
        chunk = self._chunk(state.manifest, state, msg)
        return [] if chunk is None else [chunk]

    def _manifest(self, state: _State, manifest: Manifest) -> list[Chunk]:
        if state.manifest is not None:
            if manifest != state.manifest:
                raise StreamError(
                    f"stream {manifest.stream}: a second, different manifest", reason="manifest_mismatch"
                )
            return []
        if state.commit is not None and state.commit != manifest.chunks:
            raise StreamError(
                f"stream {manifest.stream}: commit of {state.commit} chunks, manifest {manifest.chunks}",
                reason="commit_mismatch",
            )
        state.manifest = manifest
        early, state.early, state.early_bytes = state.early, {}, 0
        return [c for c in (self._chunk(manifest, state, m) for m in early.values()) if c is not None]

    def _commit(self, state: _State, msg: wire.Message) -> None:
        count = msg.meta.get("chunks")
        if not isinstance(count, int) or isinstance(count, bool) or set(msg.meta) != {"chunks"}:
            raise StreamError(
                f"stream {msg.stream}: commit meta must be {{'chunks': int}}, got {msg.meta!r:.100}",
                reason="bad_commit",
            )
        declared = state.manifest.chunks if state.manifest is not None else state.commit
        if declared is not None and declared != count:
            raise StreamError(
                f"stream {msg.stream}: commit of {count} chunks, expected {declared}",
                reason="commit_mismatch",
            )
        state.commit = count

    def _chunk(self, manifest: Manifest, state: _State, msg: wire.Message) -> Chunk | None:
        if msg.index >= manifest.chunks:
            raise StreamError(
                f"stream {msg.stream}: chunk {msg.index} beyond the {manifest.chunks} declared",
                reason="too_many_chunks",
            )
        entry = manifest.entry_for(msg.index)
        offset, count = entry.slice_of(msg.index)
        got = (msg.name, msg.dtype, msg.shape, msg.codec.name if msg.codec else "", msg.offset, msg.count)
        want = (entry.name, entry.dtype, entry.shape, entry.codec, offset, count)
        if got != want:
            raise StreamError(
                f"stream {msg.stream}: chunk {msg.index} is {got}, manifest says {want}",
                reason="chunk_mismatch",
            )
        if msg.index in state.seen:
            CHUNKS.labels(self.role, "duplicate").inc()
            return None
        state.seen.add(msg.index)
        CHUNKS.labels(self.role, "received").inc()
        return Chunk(msg.stream, msg.index, entry, offset, msg, self.device)

    def manifest(self, stream: str) -> Manifest | None:
        state = self._streams.get(stream)
        return None if state is None else state.manifest

    def complete(self, stream: str) -> bool:
        state = self._streams.get(stream)
        return (
            state is not None
            and state.manifest is not None
            and state.commit is not None
            and len(state.seen) == state.manifest.chunks
        )

    def check_timeouts(self, timeout: float) -> None:
        """StreamError for the first incomplete stream that has been silent for ``timeout`` seconds."""
        now = time.monotonic()
        for stream, state in self._streams.items():
            if now - state.touched > timeout and not self.complete(stream):
                raise StreamError(
                    f"stream {stream} incomplete after {timeout:.0f} s of silence: missing {state.missing()}",
                    reason="timeout",
                )

    def forget(self, stream: str) -> None:
        self._streams.pop(stream, None)


# Memory-aware flow control ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Flow:
    """Transport settings from a memory budget: what a sender keeps in flight, what a receiver prefetches."""

    window_messages: int
    window_bytes: int
    prefetch: int


# Each in-flight or prefetched message costs its body; encoding or decoding one more costs a few times a chunk
# (the slice, the payload, the joined body; on the receiver the decoded fp32 values, up to 8x an nf4 chunk).
# A quarter of what the budget leaves above the current RSS goes to the window.
_WINDOW_SHARE = 4


def flow_for_budget(budget: int | None, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Flow:
    """The window and prefetch that keep a process within ``budget`` bytes (None: 16 chunks)."""
    if budget is None:
        return Flow(16, 16 * chunk_bytes, 16)
    spare = budget - current_rss_bytes()
    if spare < _WINDOW_SHARE * 2 * chunk_bytes:
        raise StreamError(
            f"memory budget {human_bytes(budget)} leaves {human_bytes(max(0, spare))} above the process's "
            f"current RSS ({human_bytes(budget - spare)}): too little for {human_bytes(chunk_bytes)} chunks "
            f"(at least {human_bytes(_WINDOW_SHARE * 2 * chunk_bytes)} more)",
            reason="memory_budget",
        )
    window = max(2, spare // (_WINDOW_SHARE * chunk_bytes))
    return Flow(int(window), int(window * chunk_bytes), int(window))


def _trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc keeps freed 4 MiB buffers otherwise)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def wait_for_memory(budget: int | None, timeout: float) -> None:
    """Stop taking deliveries while the process is near its budget; StreamError if it does not come down."""
    if budget is None or current_rss_bytes() < 0.9 * budget:
        return
    deadline = time.monotonic() + timeout
    while current_rss_bytes() >= 0.9 * budget:
        _trim_heap()
        if time.monotonic() > deadline:
            raise StreamError(
                f"RSS {current_rss_bytes() >> 20} MiB stays near the budget {budget >> 20} MiB",
                reason="memory_budget",
            )
        time.sleep(0.05)


# Receiving from a queue -------------------------------------------------------------------------------------


class Receiver:
    """One container stream from a queue: yields its decoded chunks and acks each once the caller has used it.

    ``stream=None`` takes the first stream whose manifest arrives. Messages of other streams are acked and
    skipped; malformed messages are dead-lettered with their reason (the stream then times out if one was
    ours).
    """

    def __init__(
        self,
        transport: Transport,
        queue: str,
        stream: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        device: torch.device | str = "cpu",
        memory_budget: int | None = None,
        prefetch: int = 16,
        consume_arguments: dict[str, Any] | None = None,
        role: str = "client",
        on_message: Callable[[int], None] | None = None,
        on_manifest: Callable[[Manifest], None] | None = None,
    ) -> None:
        self.transport = transport
        self.queue = queue
        self.stream = stream
        self.timeout = timeout
        self.memory_budget = memory_budget
        self.role = role
        self.on_message = on_message
        self.on_manifest = on_manifest  # e.g. a progress bar learns its total
        self.assembler = Assembler(device=device, role=role)
        self.wire_bytes = 0
        self.skipped = 0
        self._prefetch = prefetch
        self._arguments = consume_arguments

    @property
    def manifest(self) -> Manifest | None:
        return None if self.stream is None else self.assembler.manifest(self.stream)

    def chunks(self) -> Iterator[Chunk]:
        tag = self.transport.consume(self.queue, prefetch=self._prefetch, arguments=self._arguments)
        try:
            yield from self._run()
        finally:
            self.transport.cancel(tag)

    def _run(self) -> Iterator[Chunk]:
        silent_since = time.monotonic()
        while self.stream is None or not self.assembler.complete(self.stream):
            wait_for_memory(self.memory_budget, self.timeout)
            delivery = self.transport.get(timeout=min(1.0, self.timeout))
            if delivery is None:
                if time.monotonic() - silent_since > self.timeout:
                    what = "no manifest" if self.stream is None else "missing parts"
                    raise StreamError(
                        f"{self.queue}: {what} after {self.timeout:.0f} s of silence", reason="timeout"
                    )
                if self.stream is not None:
                    self.assembler.check_timeouts(self.timeout)
                continue
            silent_since = time.monotonic()
            try:
                parts = wire.decode_all(delivery.body)
            except WireError as exc:
                self.transport.dead_letter(delivery, exc.reason, str(exc))  # settles it: no ack after
                continue
            yield from self._take(delivery, parts)
            self.transport.ack(delivery)

    def _take(self, delivery: Delivery, parts: list[tuple[wire.Message, memoryview]]) -> list[Chunk]:
        """The chunks a delivery completes: its message's, or those of every part of a batch (one stream)."""
        if self.stream is None and any(msg.kind == wire.MANIFEST for msg, _ in parts):
            self.stream = parts[0][0].stream
        if parts[0][0].stream != self.stream:
            self.skipped += 1
            return []
        self.wire_bytes += len(delivery.body)
        if self.on_message is not None:
            self.on_message(len(delivery.body))
        chunks: list[Chunk] = []
        for msg, part in parts:
            if msg.kind == wire.CHUNK and msg.codec is not None:
                WIRE_BYTES.labels(self.role, "received", msg.codec.name).inc(len(part))
                FP32_BYTES.labels(self.role, "received", msg.codec.name).inc(4 * msg.count)
            chunks += self.assembler.add(msg)
            if msg.kind == wire.MANIFEST and self.on_manifest is not None and self.manifest is not None:
                self.on_manifest(self.manifest)
        return chunks


@dataclass
class Container:
    manifest: Manifest
    tensors: dict[str, torch.Tensor]


def receive_container(
    transport: Transport,
    queue: str,
    stream: str | None = None,
    *,
    into: Mapping[str, torch.Tensor] | None = None,
    **options: Any,
) -> Container:
    """Rebuild a whole state dict (each tensor in its original dtype) from one stream.

    ``into``: tensors of the stream's names, shapes and dtypes to receive into (a model's state dict, as a
    client holds one), so that no model-sized memory is allocated: fresh pages cost more than the transfer on
    a loaded machine. Tensors it lacks are allocated; a tensor it has with another shape or dtype is a
    ``StreamError`` (reason ``shape``). A receive that fails part-way leaves ``into`` holding a mix of old
    and new values.
    """
    receiver = Receiver(transport, queue, stream, **options)
    tensors: dict[str, torch.Tensor] = {}
    for chunk in receiver.chunks():
        entry = chunk.entry
        if entry.name not in tensors:
            tensors[entry.name] = _destination(entry, into, chunk.device)
        target = tensors[entry.name][chunk.offset : chunk.offset + chunk.count]
        if entry.dtype == torch.float32:
            if into is not None and entry.name in into:
                target.zero_()  # the caller's tensor holds old values; fresh zeros need no clearing
            chunk.add_to(target)  # the values, decoded where they stay
        else:
            target.copy_(chunk.values())
    assert receiver.manifest is not None  # a complete stream has one
    shaped = {t.name: tensors[t.name].view(t.shape) for t in receiver.manifest.tensors}
    return Container(receiver.manifest, shaped)


def _destination(
    entry: TensorEntry, into: Mapping[str, torch.Tensor] | None, device: torch.device
) -> torch.Tensor:
    """The flat tensor a stream's tensor is rebuilt in: the caller's, or fresh zeros."""
    given = None if into is None else into.get(entry.name)
    if given is None:
        return zeros(entry.numel, entry.dtype, device)
    if tuple(given.shape) != entry.shape or given.dtype != entry.dtype or not given.is_contiguous():
        raise StreamError(
            f"{entry.name}: the stream has {entry.shape} {entry.dtype}, the destination "
            f"{tuple(given.shape)} {given.dtype}{'' if given.is_contiguous() else ' (not contiguous)'}",
            reason="shape",
        )
    return given.detach().view(-1)


def receive_file(
    transport: Transport, queue: str, path: str | Path, stream: str | None = None, **options: Any
) -> Manifest:
    """Write one stream straight into a safetensors file, preallocated from the manifest, chunk by chunk.

    The file appears under ``path`` only when the stream is complete; a failure removes the partial file.
    """
    receiver = Receiver(transport, queue, stream, **options)
    writer: SafetensorsWriter | None = None
    scratch = torch.empty(0)  # decoded values, reused chunk after chunk: fresh pages cost more than decoding
    try:
        for chunk in receiver.chunks():
            if writer is None:
                assert receiver.manifest is not None  # chunks are released only after their manifest
                metadata = receiver.manifest.meta.get("metadata")
                writer = SafetensorsWriter(
                    path, receiver.manifest.specs(), metadata if isinstance(metadata, dict) else None
                )
            if scratch.numel() < chunk.count:
                scratch = torch.empty(chunk.count, device=chunk.device)
            values = scratch[: chunk.count].zero_()
            chunk.add_to(values)
            writer.write(chunk.entry.name, chunk.offset, values)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    assert receiver.manifest is not None
    if writer is None:  # a container of tensors without elements still makes a file
        writer = SafetensorsWriter(path, receiver.manifest.specs())
    writer.commit()
    return receiver.manifest

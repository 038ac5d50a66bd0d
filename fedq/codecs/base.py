"""The codec interface: one 1-D slice of a tensor <-> a payload of bytes plus small per-chunk metadata."""

from __future__ import annotations

import abc
import contextlib
import math
import mmap
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import torch

from fedq.codecs.batch import Layout, payload_spans
from fedq.device import to_device, to_host
from fedq.errors import CodecError
from fedq.threads import kernel

# What a decoder takes: host bytes, or a 1-D uint8 tensor on any device (an ``encode_on_device`` result, or
# bytes already copied to the fold device)
Buffer = bytes | bytearray | memoryview | torch.Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# ``zeros`` populates maps of at least _HUGE_MIN_BYTES; ``empty`` maps outputs of _MALLOC_MAX_BYTES to
# _HUGE_MAX_BYTES with transparent huge pages (see each).
_HUGE_MIN_BYTES = 4 << 20
_MALLOC_MAX_BYTES = 32 << 20  # glibc's largest dynamic mmap threshold (64-bit)
_HUGE_MAX_BYTES = 256 << 20
_NORM_BLOCK = 1 << 18  # elements per float64 block of ``sum_sq`` (2 MiB of temporaries)


class Codec(abc.ABC):
    """Encodes 1-D float slices to payloads and back; the same code runs on CPU and CUDA."""

    name: ClassVar[str]
    # keys a decoder accepts in the per-chunk meta; anything else in an untrusted header is rejected
    meta_keys: ClassVar[frozenset[str]] = frozenset()

    @property
    def alignment(self) -> int:
        """Chunk element counts must be a multiple of this so that chunked and whole encodes agree."""
        return 1

    def config(self) -> dict[str, Any]:
        """Parameters decoding needs, written in every chunk header (msgpack-able)."""
        return {}

    @abc.abstractmethod
    def payload_nbytes(self, count: int) -> int:
        """Exact payload size in bytes for ``count`` elements, metadata included."""

    @abc.abstractmethod
    def encode_on_device(self, x: torch.Tensor) -> tuple[dict[str, Any], torch.Tensor]:
        """Encode a 1-D float tensor where it lies; return (per-chunk meta, the payload as a 1-D uint8 tensor
        on x's device). Value checks on a GPU go to the caller's ``deferring`` scope when one is open (each
        read of a device value would stall the queue); without one they are read before this returns."""

    def encode(self, x: torch.Tensor) -> tuple[dict[str, Any], memoryview]:
        """Encode a 1-D float tensor; return (per-chunk meta, payload bytes on the host). On a GPU only the
        payload crosses to the host, with the deferred value checks, in one copy."""
        with deferring() as checks:
            meta, payload = self.encode_on_device(x)
            copy = to_host(payload, checks.flags())
        data, flags = copy.wait()
        checks.raise_failed(flags)
        return meta, data

    @abc.abstractmethod
    def decode(self, meta: dict[str, Any], payload: Buffer, count: int, device: torch.device) -> torch.Tensor:
        """Decode a payload to a 1-D float32 tensor of ``count`` elements on ``device``."""

    @kernel
    def sq_norm(
        self, meta: dict[str, Any], payload: Buffer, count: int, device: torch.device | str = "cpu"
    ) -> float:
        """Σ x² over ``decode(meta, payload, count)``, accumulated in float64; NaN/Inf in the decoded values
        make it non-finite. Raises ``CodecError`` where ``decode`` would. This default decodes; a codec whose
        payload allows it computes the sum without materialising the decoded values."""
        return sum_sq(self.decode(meta, payload, count, torch.device(device)))

    @kernel
    def check(
        self, meta: dict[str, Any], payload: Buffer, count: int, device: torch.device | str = "cpu"
    ) -> None:
        """Raise ``CodecError`` where ``decode`` would, and for NaN/Inf in the decoded values (``nonfinite``):
        the aggregator's check of a chunk as it arrives when no norm is wanted. This default measures the
        norm; a codec whose scales bound its values checks the scales alone, without a pass over the codes."""
        if not math.isfinite(self.sq_norm(meta, payload, count, device)):
            raise CodecError(f"{self.name}: payload decodes to NaN or Inf", reason="nonfinite")

    @kernel
    def decode_add(
        self, meta: dict[str, Any], payload: Buffer, count: int, out: torch.Tensor, alpha: float
    ) -> None:
        """``out += alpha * decode(meta, payload, count)`` for the aggregator's fold, with ``out`` a float32
        1-D tensor of ``count`` elements on the fold device.

        Raises ``CodecError`` where ``decode`` would, and for NaN/Inf in the decoded values (reason
        ``nonfinite``), before ``out`` is touched; on a GPU inside ``deferring``, the value checks are the
        scope's, read after ``out`` has changed. This default decodes; a codec that can decodes in cache-sized
        steps straight into ``out``, so that a fold neither allocates nor writes a decoded copy.
        """
        check_out(self.name, out, count)
        values = self.decode(meta, payload, count, out.device)
        nonfinite = f"{self.name}: payload decodes to NaN or Inf"
        require(finite(values), lambda: CodecError(nonfinite, reason="nonfinite"))
        out.add_(values, alpha=alpha)

    def check_rows(
        self, chunks: Sequence[tuple[dict[str, Any], Buffer, int]], device: torch.device | str = "cpu"
    ) -> bool:
        """True when every (meta, payload, count) of ``chunks`` passes ``check``, found with one op sequence
        for them all; False when one may not, and then the caller checks them one by one, which names the one
        that fails (so a chunk is refused for what ``check`` refuses, never for a neighbour). A small chunk's
        check is mostly per-op overhead (~0.1 ms, whatever its size): the aggregator checks a delivery's
        chunks together. This default has no batched form."""
        return False

    def decode_add_rows(
        self,
        chunks: Sequence[tuple[dict[str, Any], Buffer]],
        count: int,
        out: torch.Tensor,
        alphas: list[float],
    ) -> bool:
        """``out += alphas[i] * decode(chunks[i])`` for each chunk in turn, with the same arithmetic, in the
        same order, as ``decode_add`` once per chunk (so the sum is bit for bit the same), decoding them
        in one op sequence: the aggregator's fold of K small chunks over one window. Returns False, with
        ``out`` untouched, where it cannot (a chunk fails a check, or no batched form): the caller then calls
        ``decode_add`` per chunk, which refuses the one at fault as it always did."""
        return False

    def payload_rows(
        self, chunks: Sequence[tuple[dict[str, Any], Buffer]], count: int, out: torch.Tensor
    ) -> torch.Tensor | None:
        """The chunks' payloads as the rows of one uint8 matrix on the host, for a ``decode_add_rows``; None
        where a chunk or ``out`` fails its size checks (the caller then adds chunk by chunk, which names the
        one at fault) or the payloads are not host bytes."""
        try:
            check_out(self.name, out, count)
            for meta, payload in chunks:
                self.check_payload(meta, payload, count)
        except CodecError:
            return None
        return host_rows([p for _, p in chunks], out.device)

    def decode_part(
        self, meta: dict[str, Any], payload: Buffer, count: int, lo: int, hi: int, device: torch.device
    ) -> torch.Tensor:
        """Elements ``lo .. hi`` of ``decode(meta, payload, count)``, decoding only the alignment units that
        hold them (``cut``): a window rule's fold takes a chunk in several sub-windows when K whole chunks
        would exceed its memory, and would otherwise decode it once per piece."""
        self.check_payload(meta, payload, count)
        if not 0 <= lo <= hi <= count:
            raise CodecError(f"{self.name}: part {lo}..{hi} outside {count} elements", reason="codec_size")
        a = lo - lo % self.alignment
        b = min(count, -(-hi // self.alignment) * self.alignment)
        if (a, b) == (0, count):
            return self.decode(meta, payload, count, device)[lo:hi]
        return self.decode(meta, self.cut(payload, count, a, b), b - a, device)[lo - a : hi - a]

    @property
    def batch_unit(self) -> int:
        """What the slices of a ``Layout`` given to ``encode_batch`` and its decoders must start at a multiple
        of (a blockwise codec's block)."""
        return 1

    def encode_batch(self, flat: torch.Tensor, layout: Layout) -> tuple[list[dict[str, Any]], torch.Tensor]:
        """Encode each slice of ``flat`` (float32, laid out by ``layout``, zero between the slices): (each
        slice's meta, the payloads back to back in one uint8 tensor on flat's device), the same bytes as
        ``encode_on_device`` gives each slice alone. This default encodes one slice at a time; a codec whose
        per-call work dominates small slices encodes them all in one op sequence."""
        metas, payloads = [], []
        for view in layout.views(flat):
            meta, payload = self.encode_on_device(view)
            metas.append(meta)
            payloads.append(payload)
        return metas, torch.cat(payloads) if payloads else flat.new_empty(0, dtype=torch.uint8)

    def decode_batch(
        self, metas: list[dict[str, Any]], blob: torch.Tensor, layout: Layout, out: torch.Tensor
    ) -> None:
        """Decode payloads laid back to back in ``blob`` (as ``encode_batch`` gives them) into the slices of
        ``out`` (float32, laid out by ``layout``), each as ``decode`` would; ``out`` is zero between the
        slices afterwards."""
        out.zero_()
        spans = payload_spans([self.payload_nbytes(n) for n in layout.counts])
        for meta, (lo, hi), view in zip(metas, spans, layout.views(out), strict=True):
            view.copy_(self.decode(meta, own_bytes(blob[lo:hi]), view.numel(), out.device))

    def decode_add_batch(
        self, metas: list[dict[str, Any]], blob: torch.Tensor, layout: Layout, out: torch.Tensor, alpha: float
    ) -> None:
        """``decode_add`` of each payload in ``blob`` into its slice of ``out``; what lies between the slices
        stays as it was."""
        spans = payload_spans([self.payload_nbytes(n) for n in layout.counts])
        for meta, (lo, hi), view in zip(metas, spans, layout.views(out), strict=True):
            self.decode_add(meta, own_bytes(blob[lo:hi]), view.numel(), view, alpha)

    def check_batch(self, metas: list[dict[str, Any]], blob: torch.Tensor, layout: Layout) -> None:
        """Validate untrusted batch arguments (``check_payload`` of each slice, sizes adding up)."""
        if len(metas) != len(layout.counts):
            raise CodecError(f"{self.name}: {len(metas)} metas for {len(layout.counts)} slices")
        expected = 0
        for meta, n in zip(metas, layout.counts, strict=True):
            if not isinstance(meta, dict) or not set(meta) <= self.meta_keys:
                raise CodecError(
                    f"{self.name}: unexpected chunk meta {meta!r}; accepted keys {sorted(self.meta_keys)}"
                )
            expected += self.payload_nbytes(n)
        if blob.dtype != torch.uint8 or blob.dim() != 1 or blob.numel() != expected:
            raise CodecError(
                f"{self.name}: payloads of {_describe(blob)} for {len(metas)} slices ({expected} bytes "
                "expected)",
                reason="codec_size",
            )

    @abc.abstractmethod
    def cut(self, payload: Buffer, count: int, a: int, b: int) -> Buffer:
        """The payload of elements ``a .. b`` of a checked payload of ``count`` (``a`` a multiple of
        ``alignment``, ``b`` one too or ``count``), decodable on its own with the chunk's meta."""

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{self.name}({params})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Codec) and (self.name, self.config()) == (other.name, other.config())

    def __hash__(self) -> int:
        return hash((self.name, tuple(sorted(self.config().items()))))

    def check_input(self, x: torch.Tensor) -> torch.Tensor:
        """Reject what no codec can encode, before any work is done; return x detached and contiguous
        (a parameter that requires grad may be passed as it is)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 1 or x.dtype not in FLOAT_DTYPES:
            raise CodecError(
                f"{self.name}: expected a 1-D float32/float16/bfloat16 tensor, got {_describe(x)}"
            )
        return x.detach().contiguous()

    def check_payload(self, meta: Any, payload: Buffer, count: Any) -> None:
        """Validate untrusted decode arguments so that no size is trusted before it is checked."""
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise CodecError(f"{self.name}: element count must be a non-negative int, got {count!r}")
        if not isinstance(meta, dict) or not set(meta) <= self.meta_keys:
            raise CodecError(
                f"{self.name}: unexpected chunk meta {meta!r}; accepted keys {sorted(self.meta_keys)}"
            )
        if isinstance(payload, torch.Tensor):
            if payload.dtype != torch.uint8 or payload.dim() != 1:
                raise CodecError(f"{self.name}: a payload tensor must be 1-D uint8, got {_describe(payload)}")
        elif not isinstance(payload, bytes | bytearray | memoryview):
            raise CodecError(f"{self.name}: payload must be bytes, got {type(payload).__name__}")
        expected = self.payload_nbytes(count)
        if nbytes(payload) != expected:
            raise CodecError(
                f"{self.name}: payload of {nbytes(payload)} bytes does not match {count} elements "
                f"({expected} bytes expected)",
                reason="codec_size",
            )


def own_bytes(payload: torch.Tensor) -> torch.Tensor:
    """A payload cut from a batch's bytes, copied where it does not start 8-byte aligned: decoders view
    its float32 sections in place, which torch allows only at aligned offsets."""
    return payload if payload.storage_offset() % 8 == 0 else payload.clone()


def check_out(name: str, out: torch.Tensor, count: int) -> None:
    if out.dtype != torch.float32 or out.shape != (count,):
        raise CodecError(
            f"{name}: decode_add needs a float32 tensor of shape ({count},), got {_describe(out)}"
        )


def finite(x: torch.Tensor) -> torch.Tensor:
    """Whether x holds no NaN or Inf, as a 0-d bool tensor on x's device. NaN propagates through min/max and
    Inf shows in them: one reduction, ~20x faster than isfinite."""
    if not x.numel():
        return torch.ones((), dtype=torch.bool, device=x.device)
    lo, hi = torch.aminmax(x)
    return torch.isfinite(lo) & torch.isfinite(hi)


def sum_sq(values: torch.Tensor) -> float:
    """Σ x² in float64, block by block (a whole-tensor float64 copy would cost 2x the tensor and be slow)."""
    total = 0.0
    for block in values.reshape(-1).split(_NORM_BLOCK):
        wide = block.double()
        total += float(torch.dot(wide, wide))
    return total


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def nbytes(payload: Buffer) -> int:
    return payload.numel() if isinstance(payload, torch.Tensor) else memoryview(payload).nbytes


def span(payload: Buffer, lo: int, hi: int) -> Buffer:
    """Bytes ``lo .. hi`` of a payload, without a copy, where the payload is."""
    return payload[lo:hi] if isinstance(payload, torch.Tensor) else memoryview(payload).cast("B")[lo:hi]


def host_views(payloads: Sequence[Buffer], device: torch.device | str) -> list[memoryview] | None:
    """Payloads as byte views, for a batched check or decode on the CPU; None where that is not what they
    are (a payload already on a device, or a GPU)."""
    views = [memoryview(p).cast("B") for p in payloads if not isinstance(p, torch.Tensor)]
    return views if torch.device(device).type == "cpu" and len(views) == len(payloads) else None


def host_rows(payloads: Sequence[Buffer], device: torch.device | str) -> torch.Tensor | None:
    """Host payloads of one size as the rows of a uint8 matrix (one copy of their bytes), for a batched
    decode on the CPU; None where ``host_views`` is, or when they are empty (nothing to batch)."""
    views = host_views(payloads, device)
    if not views or not len(views[0]):
        return None
    return host_bytes(views).view(len(views), len(views[0]))


def host_bytes(parts: list[memoryview]) -> torch.Tensor:
    """Byte views one after another, as one uint8 tensor (a copy: small parts of many chunks)."""
    data = bytearray(b"".join(parts))
    return torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def join(payload: Buffer, spans: list[tuple[int, int]]) -> Buffer:
    """The bytes of ``spans`` of a payload one after another, where the payload is (a tensor's on its
    device)."""
    if isinstance(payload, torch.Tensor):
        return torch.cat([payload[lo:hi] for lo, hi in spans])
    view = memoryview(payload).cast("B")
    return b"".join(view[lo:hi] for lo, hi in spans)


def as_uint8(payload: Buffer, device: torch.device | str) -> torch.Tensor:
    """A payload as a read-only uint8 tensor on ``device``: a view where it already is there, else a copy
    (host bytes to a GPU through a pinned buffer, ``fedq.device.to_device``).

    Decoders only read it and always write their result to new memory, so a caller's bytes are never aliased.
    """
    dev = torch.device(device)
    if isinstance(payload, torch.Tensor):
        return payload if payload.device == dev else payload.to(dev)
    return to_device(payload, dev).ready()


def empty(count: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised 1-D tensor for a codec's output.

    A decoded tensor is fresh memory, and on this kind of machine (a VM) touching fresh 4 KiB pages costs more
    than decoding into them: measured, writing a new fp32 buffer runs at ~550 M elem/s with 4 KiB pages and
    at ~2400 M elem/s with 2 MiB pages (on an unfragmented machine). So large CPU outputs are private
    anonymous maps advised to use huge pages; the tensor keeps its map alive and frees it with its storage.
    Not below 32 MiB: smaller blocks come from glibc's heap once one of their size has been freed (its mmap
    threshold rises to the largest freed, up to 32 MiB), so a repeated decode reuses memory already faulted in
    (measured on gpt2's shapes, most outputs 2-9 MiB, medians of 4 alternating rounds: nf4 decode 672 -> 1069
    M elem/s at the default threads, 312 -> 392 under 2 busy processes per core; int8 decode unchanged within
    the noise; docs/performance.md).
    Not beyond 256 MiB: huge pages come from the kernel's free 2 MiB blocks, and past the few hundred MiB
    recently freed there, from memory a VM's host has not backed yet, which faulted in at ~28 M elem/s of
    decode on this 2-core VM under load (a 1 GiB output of Llama's embeddings; 104-258 with 4 KiB pages, which
    the kernel takes from recently freed memory first; up to 490 with huge pages that were recycled).
    Elsewhere (CUDA, small or larger outputs, a kernel without transparent huge pages) it is a plain
    ``torch.empty``. Hot paths avoid fresh outputs altogether (``Codec.decode_add`` into reused or ``zeros``
    memory).
    """
    nbytes = count * dtype.itemsize
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    huge = _MALLOC_MAX_BYTES <= nbytes <= _HUGE_MAX_BYTES
    if torch.device(device).type != "cpu" or not huge or advice is None:
        return torch.empty(count, dtype=dtype, device=device)
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError):  # THP compiled out: plain pages still work
        region.madvise(advice)
    return torch.frombuffer(region, dtype=dtype)


def zeros(count: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-filled 1-D tensor for a tensor rebuilt chunk by chunk (by ``Codec.decode_add`` into it).

    On the CPU a large one is an anonymous map that the kernel hands out zeroed and populates in one go:
    measured per GiB, 0.6 s populated up front against 1.1-1.2 s faulted in page by page as chunks land, and
    4.7 s when advised to use huge pages while the page cache (the broker's message store) fragments memory.
    """
    populate = getattr(mmap, "MAP_POPULATE", None)
    if torch.device(device).type != "cpu" or count * dtype.itemsize < _HUGE_MIN_BYTES or populate is None:
        return torch.zeros(count, dtype=dtype, device=device)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate
    return torch.frombuffer(mmap.mmap(-1, count * dtype.itemsize, flags=flags), dtype=dtype)


_scope = threading.local()


class DeferredChecks:
    """A codec's value checks on a GPU, gathered as device booleans and read together.

    Reading a device value is a host round trip that waits for every kernel queued before it; a codec checks a
    few values per step, so a GPU encode or fold that read each at once would run at the speed of those round
    trips. Inside ``deferring`` a check on a GPU is kept here, tagged with ``tag`` (the caller says what was
    being worked on), and the owner of the scope reads them all in one go. On the CPU a check is read at once,
    which costs nothing there, so a CPU payload is refused before anything is written, as before.
    """

    def __init__(self) -> None:
        self.tag: object = None
        self._flags: list[torch.Tensor] = []
        self._errors: list[tuple[object, Callable[[], CodecError]]] = []

    def add(self, ok: torch.Tensor, error: Callable[[], CodecError]) -> None:
        self._flags.append(ok.reshape(()))
        self._errors.append((self.tag, error))

    def flags(self) -> torch.Tensor | None:
        """The checks so far as one device bool tensor (no round trip), or None when there are none."""
        return torch.stack(self._flags) if self._flags else None

    def failed(self) -> list[tuple[object, CodecError]]:
        """(tag, error) of each check that failed: one round trip for all of them."""
        flags = self.flags()
        return self._failed([] if flags is None else [bool(v) for v in flags.tolist()])

    def raise_failed(self, flags: list[bool]) -> None:
        """Raise the first failed check's error, given ``flags()`` as the caller read them (with a copy it
        waited for anyway). They cover the checks made before ``flags()`` was taken; a sender then decodes
        its own payload for error feedback, whose checks those of the encode already imply."""
        if failed := self._failed(flags):
            raise failed[0][1]

    def _failed(self, flags: list[bool]) -> list[tuple[object, CodecError]]:
        made = self._errors[: len(flags)]
        return [(tag, error()) for (tag, error), ok in zip(made, flags, strict=True) if not ok]


@contextlib.contextmanager
def deferring() -> Iterator[DeferredChecks]:
    """Defer the GPU value checks of the codec calls made in this scope (and this thread) to the returned
    ``DeferredChecks``, which the caller reads; an enclosing scope gets none of them."""
    outer = getattr(_scope, "checks", None)
    _scope.checks = checks = DeferredChecks()
    try:
        yield checks
    finally:
        _scope.checks = outer


def deferred(device: torch.device) -> bool:
    """Whether a check on ``device`` made now would be deferred (a GPU, inside ``deferring``)."""
    return device.type != "cpu" and getattr(_scope, "checks", None) is not None


def require(ok: torch.Tensor, error: Callable[[], CodecError]) -> None:
    """Raise ``error()`` unless ``ok`` (a 0-d bool tensor) holds: at once, or, for a GPU tensor inside
    ``deferring``, when the scope's owner reads its checks."""
    if deferred(ok.device):
        _scope.checks.add(ok, error)
    elif not bool(ok):
        raise error()


def slices(count: int, step: int) -> Iterator[tuple[int, int]]:
    """[lo, hi) ranges of at most ``step`` elements covering ``count``; bounds the temporaries of a codec."""
    for lo in range(0, count, step):
        yield lo, min(lo + step, count)

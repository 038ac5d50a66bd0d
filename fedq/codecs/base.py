"""The codec interface: one 1-D slice of a tensor <-> a payload of bytes plus small per-chunk metadata."""

from __future__ import annotations

import abc
import contextlib
import math
import mmap
import warnings
from collections.abc import Iterator
from typing import Any, ClassVar

import torch

from fedq.errors import CodecError
from fedq.threads import kernel

Buffer = bytes | bytearray | memoryview

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Outputs at least this large are mapped with transparent huge pages (see ``empty``).
_HUGE_MIN_BYTES = 4 << 20
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
    def encode(self, x: torch.Tensor) -> tuple[dict[str, Any], Buffer]:
        """Encode a 1-D float tensor; return (per-chunk meta, payload bytes on the CPU)."""

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
        ``nonfinite``), always before ``out`` is touched. This default decodes; a codec that can decodes in
        cache-sized steps straight into ``out``, so that a fold neither allocates nor writes a decoded copy.
        """
        check_out(self.name, out, count)
        values = self.decode(meta, payload, count, out.device)
        if not all_finite(values):
            raise CodecError(f"{self.name}: payload decodes to NaN or Inf", reason="nonfinite")
        out.add_(values, alpha=alpha)

    def decode_part(
        self, meta: dict[str, Any], payload: Buffer, count: int, lo: int, hi: int, device: torch.device
    ) -> torch.Tensor:
        """Elements ``lo .. hi`` of ``decode(meta, payload, count)``, decoding only the alignment units that
        hold them where the payload can be cut (``cut``): a window rule's fold takes a chunk in several
        sub-windows when K whole chunks would exceed its memory, and would otherwise decode it once per piece.
        """
        self.check_payload(meta, payload, count)
        if not 0 <= lo <= hi <= count:
            raise CodecError(f"{self.name}: part {lo}..{hi} outside {count} elements", reason="codec_size")
        a = lo - lo % self.alignment
        b = min(count, -(-hi // self.alignment) * self.alignment)
        part = None if (a, b) == (0, count) else self.cut(payload, count, a, b)
        if part is None:
            return self.decode(meta, payload, count, device)[lo:hi]
        return self.decode(meta, part, b - a, device)[lo - a : hi - a]

    def cut(self, payload: Buffer, count: int, a: int, b: int) -> Buffer | None:
        """The payload of elements ``a .. b`` of a checked payload of ``count`` (``a`` a multiple of
        ``alignment``, ``b`` one too or ``count``), decodable on its own with the chunk's meta; None where the
        payload cannot be cut (this default)."""
        return None

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
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise CodecError(f"{self.name}: payload must be bytes, got {type(payload).__name__}")
        expected = self.payload_nbytes(count)
        if memoryview(payload).nbytes != expected:
            raise CodecError(
                f"{self.name}: payload of {memoryview(payload).nbytes} bytes does not match {count} elements "
                f"({expected} bytes expected)",
                reason="codec_size",
            )


def check_out(name: str, out: torch.Tensor, count: int) -> None:
    if out.dtype != torch.float32 or out.shape != (count,):
        raise CodecError(
            f"{name}: decode_add needs a float32 tensor of shape ({count},), got {_describe(out)}"
        )


def all_finite(x: torch.Tensor) -> bool:
    """NaN propagates through min/max and Inf shows in them: one reduction, ~20x faster than isfinite."""
    if not x.numel():
        return True
    lo, hi = torch.aminmax(x)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


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


def as_uint8(payload: Buffer, device: torch.device) -> torch.Tensor:
    """A payload as a read-only uint8 tensor on ``device``: a view on the CPU, a copy on another device.

    Decoders only read it and always write their result to new memory, so a caller's bytes are never aliased.
    """
    view = memoryview(payload).cast("B")
    if not len(view):
        return torch.empty(0, dtype=torch.uint8, device=device)
    with warnings.catch_warnings():  # torch warns that the buffer is read-only; it is never written
        warnings.simplefilter("ignore", UserWarning)
        t = torch.frombuffer(view, dtype=torch.uint8)
    return t.to(device) if torch.device(device).type != "cpu" else t


def empty(count: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised 1-D tensor for a codec's output.

    A decoded tensor is fresh memory, and on this kind of machine (a VM) touching fresh 4 KiB pages costs more
    than decoding into them: measured, writing a new fp32 buffer runs at ~550 M elem/s with 4 KiB pages and
    at ~2400 M elem/s with 2 MiB pages (on an unfragmented machine). So large CPU outputs are private
    anonymous maps advised to use huge pages; the tensor keeps its map alive and frees it with its storage.
    Elsewhere (CUDA, small outputs, or a kernel without transparent huge pages) it is a plain ``torch.empty``.
    Hot paths avoid fresh outputs altogether (``Codec.decode_add`` into reused or ``zeros`` memory).
    """
    nbytes = count * dtype.itemsize
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if torch.device(device).type != "cpu" or nbytes < _HUGE_MIN_BYTES or advice is None:
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


def to_payload(t: torch.Tensor) -> memoryview:
    """A tensor's bytes on the CPU as a memoryview; no copy for a contiguous CPU tensor."""
    t = t.detach().contiguous()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.view(torch.uint8).numpy().data.cast("B")


def slices(count: int, step: int) -> Iterator[tuple[int, int]]:
    """[lo, hi) ranges of at most ``step`` elements covering ``count``; bounds the temporaries of a codec."""
    for lo in range(0, count, step):
        yield lo, min(lo + step, count)

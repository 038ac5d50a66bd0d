"""Error feedback: the part of an update that quantization dropped is added to the next round's update.

Without it, a codec's rounding error is lost every round and the model drifts away from what full-precision
updates would give; with it, the sum of what was sent over any number of rounds differs from the sum of the
true updates by one residual only (telescoping: sent_t = x_t + r_{t-1} - r_t).

Memory: one residual per quantized tensor, kept on the tensor's device: 4 bytes per parameter in float32
(Llama-3.2-1B: 4.9 GB), 2 in bfloat16 (``ErrorFeedback(torch.bfloat16)``); ``EncodedErrorFeedback`` keeps
them nf4-encoded, a CPU tensor's on disk. bfloat16 rounds each residual to 8
significant bits, which measured no worse: over 50 rounds of N(0, 0.02) updates, the gap between summed sent
and summed true updates was 1.002 (nf4) / 1.001 (int8) residuals with float32 storage, 1.008 / 0.998 with
bfloat16, and 7.06 / 7.11 without feedback (growing like sqrt(rounds)); see tests/test_codecs_feedback.py.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from fedq import scratch
from fedq.codecs.base import Codec
from fedq.codecs.batch import Layout, payload_spans
from fedq.codecs.registry import get_codec
from fedq.errors import CodecError
from fedq.fileio import bytes_of, pread_into, pwrite_all


class ErrorFeedback:
    """Residuals keyed by (tensor name, element offset), so a streaming sender can work chunk by chunk.

    Per chunk and round: ``y = fb.compensate(name, x, offset)``, encode ``y``, decode the payload as the
    receiver will, then ``fb.update(name, y, decoded, offset)``. A whole tensor is the chunk at offset 0. The
    chunking of a tensor must stay the same across rounds (it does: it follows from the codec's alignment).
    """

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        if dtype not in (torch.float32, torch.bfloat16):
            raise CodecError(f"error feedback stores residuals in float32 or bfloat16, not {dtype}")
        self.dtype = dtype
        self._residuals: dict[tuple[str, int], torch.Tensor] = {}

    def compensate(self, name: str, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """``x`` plus the residual this chunk left last round, as float32: the values to encode this round."""
        residual = self._residuals.get((name, offset))
        if residual is None:
            return x.to(torch.float32)
        if residual.shape != x.shape:
            raise CodecError(
                f"{name!r}@{offset}: residual has shape {tuple(residual.shape)}, chunk {tuple(x.shape)}; "
                "the chunking of a tensor must not change between rounds"
            )
        return torch.add(x, residual, out=torch.empty(x.shape, dtype=torch.float32, device=x.device))

    def update(self, name: str, sent: torch.Tensor, decoded: torch.Tensor, offset: int = 0) -> None:
        """Keep ``sent - decoded``, what the receiver will not see of this chunk, for the next round."""
        key = (name, offset)
        residual = self._residuals.get(key)
        if residual is None or residual.shape != sent.shape or residual.device != sent.device:
            residual = self._residuals[key] = torch.empty(sent.shape, dtype=self.dtype, device=sent.device)
        torch.sub(sent, decoded, out=residual)

    @property
    def nbytes(self) -> int:
        """Memory held by the residuals."""
        return sum(r.numel() * r.element_size() for r in self._residuals.values())

    @property
    def batch_unit(self) -> int:
        """What the slices of a batch's ``Layout`` must start at a multiple of (``Codec.batch_unit``)."""
        return 1

    def compensate_batch(
        self, keys: list[tuple[str, int]], pieces: list[torch.Tensor], flat: torch.Tensor, layout: Layout
    ) -> None:
        """``compensate`` of chunks (name, offset) of ``keys`` into the slices of ``flat`` (float32, laid out
        by ``layout``), which hold the chunks' values ``pieces`` in float32; what lies between the slices
        stays as it was. A sender encodes many small chunks at once this way (``fedq.codecs.batch``); this
        default takes one chunk at a time, as it came (a bfloat16 chunk plus a bfloat16 residual is added
        in bfloat16)."""
        for (name, offset), piece, view in zip(keys, pieces, layout.views(flat), strict=True):
            view.copy_(self.compensate(name, piece, offset))

    def update_batch(
        self, keys: list[tuple[str, int]], sent: torch.Tensor, decoded: torch.Tensor, layout: Layout
    ) -> None:
        """``update`` of each slice: ``sent`` and ``decoded`` laid out by ``layout``, zero between slices."""
        for (name, offset), s, d in zip(keys, layout.views(sent), layout.views(decoded), strict=True):
            self.update(name, s, d, offset)


class EncodedErrorFeedback(ErrorFeedback):
    """Error feedback with its residuals kept encoded (by default nf4: ~0.52 bytes per parameter, an eighth
    of float32), and a CPU tensor's kept on disk: the lean client's choice, so that fedq's state in memory is
    a few chunks' transients whatever the model's size.

    Even encoded, the residuals of a bf16 model are 26% of it (Llama-3.2-1B: 738 MiB of 2858 MiB), more than
    the quarter a lean client may hold. Like the received version (``fedq.basestore``), a CPU tensor's
    residuals are in an unlinked temporary file, one fixed place per chunk, read back when the chunk is next
    sent: disk traffic of the encoded residuals' size each way per send, through the page cache (which the
    kernel can drop; it is not the process's memory). A GPU tensor's stay on its device, in slabs (they never
    cross to the host).

    The stored residual is the residual's own quantization, so what it drops (a few percent of a residual,
    itself a few percent of an update) is lost; a residual is never encoded twice, so that loss does not
    compound. Chunks hold whole codec blocks (the chunker aligns them), so encoding a residual chunk is exact
    in layout.
    """

    def __init__(self, codec: Codec | None = None, directory: str | None = None) -> None:
        super().__init__(torch.float32)
        self.codec = codec if codec is not None else get_codec("nf4")
        self._encoded: dict[tuple[str, int], tuple[dict[str, Any], _Place, int]] = {}
        self._file = _ResidualFile(directory)
        self._slabs = _Slabs()

    def compensate(self, name: str, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        stored = self._encoded.get((name, offset))
        if stored is None:
            return x.to(torch.float32)
        meta, place, count = stored
        if count != x.numel():
            raise CodecError(
                f"{name!r}@{offset}: residual of {count} elements, chunk of {x.numel()}; "
                "the chunking of a tensor must not change between rounds"
            )
        out = x.to(torch.float32, copy=True).reshape(-1)
        self.codec.decode_add(meta, place.load(), count, out, 1.0)
        return out.view(x.shape)

    def update(self, name: str, sent: torch.Tensor, decoded: torch.Tensor, offset: int = 0) -> None:
        residual = torch.sub(sent, decoded).reshape(-1)
        meta, payload = self.codec.encode_on_device(residual)
        held = self._encoded.get((name, offset))
        place = held[1] if held is not None and held[1].fits(payload) else self._place_for(payload)
        place.store(payload)
        self._encoded[(name, offset)] = (meta, place, residual.numel())

    def _place_for(self, payload: torch.Tensor) -> _Place:
        if payload.device.type == "cpu":
            return self._file.take(payload.numel())
        return _SlabPlace(self._slabs.take(payload.numel(), payload.device))

    @property
    def batch_unit(self) -> int:
        return self.codec.batch_unit

    def compensate_batch(
        self, keys: list[tuple[str, int]], pieces: list[torch.Tensor], flat: torch.Tensor, layout: Layout
    ) -> None:
        """The slices' residuals read back together (one read where their places follow each other, as
        ``update_batch`` lays them) and added in one batched decode to the float32 values in ``flat``."""
        stored = [self._encoded.get(key) for key in keys]
        if all(held is None for held in stored):
            return  # nothing held yet: the values themselves, as compensate gives them
        if any(held is None for held in stored):
            super().compensate_batch(keys, pieces, flat, layout)
            return
        held = [h for h in stored if h is not None]
        for (name, offset), (_, _, count), n in zip(keys, held, layout.counts, strict=True):
            if count != n:
                raise CodecError(
                    f"{name!r}@{offset}: residual of {count} elements, chunk of {n}; "
                    "the chunking of a tensor must not change between rounds"
                )
        blob = _load([place for _, place, _ in held])
        self.codec.decode_add_batch([meta for meta, _, _ in held], blob, layout, flat, 1.0)

    def update_batch(
        self, keys: list[tuple[str, int]], sent: torch.Tensor, decoded: torch.Tensor, layout: Layout
    ) -> None:
        """The residuals encoded in one batch and stored in consecutive places, written at once; ``decoded``
        is overwritten (by the residuals: one buffer fewer to fault in)."""
        meta, blob = self.codec.encode_batch(torch.sub(sent, decoded, out=decoded), layout)
        sizes = [self.codec.payload_nbytes(n) for n in layout.counts]
        places = self._places_for_batch(keys, sizes, blob.device)
        _store(places, blob)
        for key, m, place, n in zip(keys, meta, places, layout.counts, strict=True):
            self._encoded[key] = (m, place, n)

    def _places_for_batch(
        self, keys: list[tuple[str, int]], sizes: list[int], device: torch.device
    ) -> list[_Place]:
        """The places the keys held last round where they still fit and follow each other (every round but
        the first), else new consecutive ones (the old are left unused, as ``update`` leaves a place that no
        longer fits)."""
        held = [self._encoded.get(key) for key in keys]
        places = [h[1] for h in held if h is not None]
        if len(places) == len(keys) and _consecutive(places, sizes, device):
            return places
        if device.type == "cpu":
            run = self._file.take(sum(sizes))
            return [_FilePlace(run.fd, run.start + lo, hi - lo) for lo, hi in payload_spans(sizes)]
        slab = self._slabs.take(sum(sizes), device)
        return [_SlabPlace(slab[lo:hi]) for lo, hi in payload_spans(sizes)]

    @property
    def nbytes(self) -> int:
        """Bytes of the encoded residuals (on disk for CPU tensors)."""
        return sum(place.nbytes for _, place, _ in self._encoded.values())

    def close(self) -> None:
        """Delete the residuals' file (it is also gone when the process ends)."""
        self._file.close()


class _Place(Protocol):
    """Where one chunk's encoded residual is kept; a residual encoded again is stored in the same place."""

    @property
    def nbytes(self) -> int: ...

    def fits(self, payload: torch.Tensor) -> bool: ...

    def store(self, payload: torch.Tensor) -> None: ...

    def load(self) -> torch.Tensor: ...


class _ResidualFile:
    """Encoded residuals of CPU tensors at fixed offsets of an unlinked temporary file (in ``directory``, else
    under ``$TMPDIR``: ``fedq.scratch``).

    Chunks are encoded on several threads at once: each reads and writes its own place (``pread``/``pwrite``
    need no lock); places are taken under a lock."""

    def __init__(self, directory: str | None) -> None:
        self._file = scratch.temporary_file(scratch.directory(directory))
        self._end = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> _FilePlace:
        with self._lock:
            start, self._end = self._end, self._end + nbytes
        return _FilePlace(self._file.fileno(), start, nbytes)

    def close(self) -> None:
        self._file.close()


@dataclass
class _FilePlace:
    fd: int
    start: int
    nbytes: int

    def fits(self, payload: torch.Tensor) -> bool:
        return payload.device.type == "cpu" and payload.numel() == self.nbytes

    def store(self, payload: torch.Tensor) -> None:
        pwrite_all(self.fd, bytes_of(payload.contiguous().numpy()), self.start)

    def load(self) -> torch.Tensor:
        out = torch.empty(self.nbytes, dtype=torch.uint8)
        pread_into(self.fd, bytes_of(out.numpy()), self.start)
        return out


@dataclass
class _SlabPlace:
    slot: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.slot.numel()

    def fits(self, payload: torch.Tensor) -> bool:
        return payload.device == self.slot.device and payload.numel() == self.slot.numel()

    def store(self, payload: torch.Tensor) -> None:
        self.slot.copy_(payload)

    def load(self) -> torch.Tensor:
        return self.slot


def _consecutive(places: list[_Place], sizes: list[int], device: torch.device) -> bool:
    """Whether ``places`` hold ``sizes`` bytes each on ``device``, one right after the other."""
    if device.type == "cpu":
        files = [p for p in places if isinstance(p, _FilePlace)]
        return len(files) == len(places) and all(
            p.nbytes == n and p.fd == files[0].fd and p.start == files[0].start + lo
            for p, n, (lo, _) in zip(files, sizes, payload_spans(sizes), strict=True)
        )
    slots = [p for p in places if isinstance(p, _SlabPlace)]
    return len(slots) == len(places) and all(
        p.slot.device == device and p.nbytes == n for p, n in zip(slots, sizes, strict=True)
    )


def _load(places: list[_Place]) -> torch.Tensor:
    """The places' bytes back to back: one read where they are consecutive in the residuals' file."""
    sizes = [p.nbytes for p in places]
    if places and _consecutive(places, sizes, torch.device("cpu")):
        first = places[0]
        assert isinstance(first, _FilePlace)
        return _FilePlace(first.fd, first.start, sum(sizes)).load()
    return torch.cat([p.load() for p in places])


def _store(places: list[_Place], blob: torch.Tensor) -> None:
    """``blob`` (the places' payloads back to back) into the places: one write where they are consecutive in
    the residuals' file."""
    sizes = [p.nbytes for p in places]
    if places and _consecutive(places, sizes, torch.device("cpu")):
        first = places[0]
        assert isinstance(first, _FilePlace)
        _FilePlace(first.fd, first.start, sum(sizes)).store(blob)
        return
    for place, (lo, hi) in zip(places, payload_spans(sizes), strict=True):
        place.store(blob[lo:hi])


SLAB_BYTES = 64 << 20  # above glibc's largest mmap threshold (32 MiB): a slab is a map of its own
_ALIGN = 64  # bytes between the starts of two places (a cache line)


class _Slabs:
    """Fixed places for a device's encoded residuals, carved from 64 MiB buffers that are never freed while
    the feedback lives; a residual encoded again is copied into its place.

    Each residual allocated on its own is a long-lived 4 MiB block among the send's transient ones (a
    chunk's delta, its decode, the message), and glibc's heap then keeps the holes between them: measured
    with Llama-3.2-1B's embedding, lm_head and two of its layers in bf16, a send grew the client by 1.8 GB
    for 318 MiB of residuals; 0.42 GB with these slabs, as with every allocation of 1 MiB or more mapped on
    its own (``MALLOC_MMAP_THRESHOLD_``). Encoder threads take places at once: under a lock.
    """

    def __init__(self) -> None:
        self._free: dict[torch.device, torch.Tensor] = {}  # the unused tail of each device's newest slab
        self._lock = threading.Lock()

    def take(self, nbytes: int, device: torch.device) -> torch.Tensor:
        """An uninitialised uint8 place of ``nbytes`` on ``device``."""
        spaced = -(-nbytes // _ALIGN) * _ALIGN  # the next place starts aligned (payloads are read as float32)
        with self._lock:
            tail = self._free.get(device)
            if tail is None or tail.numel() < spaced:
                tail = torch.empty(max(spaced, SLAB_BYTES), dtype=torch.uint8, device=device)
            self._free[device] = tail[spaced:]
        return tail[:nbytes]

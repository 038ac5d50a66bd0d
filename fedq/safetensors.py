"""safetensors files, read tensor by tensor from a memory map and written slice by slice at their offsets.

Format: an 8-byte little-endian header length, a JSON header mapping each tensor name to its ``dtype``,
``shape`` and ``data_offsets`` (relative to the end of the header) plus an optional ``__metadata__`` map of
strings, then the raw little-endian data. Models larger than RAM go through because nothing here holds a whole
file: the reader hands out views over the map and drops the pages of a slice once the caller is done with it
(``release``), and the writer ``pwrite``s slices into a preallocated file, so neither grows the process's
resident set with the model.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import torch

from fedq.errors import StreamError
from fedq.fileio import pwrite_all

DTYPES: dict[str, torch.dtype] = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100 << 20  # the reference implementation's bound
_BLOCK = 4096  # O_DIRECT alignment of file positions, lengths and memory (a page: enough for any disk)
_RUN_BUFFER = 8 << 20  # bytes per O_DIRECT write
_RUN_BUFFERS = 4  # a writer's buffers: up to three writes in flight
_READ_AHEAD = 2  # slices a file reader reads ahead of the one in use


class TensorSpec(NamedTuple):
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def _bad(path: Path, why: str) -> StreamError:
    return StreamError(f"{path}: not a readable safetensors file: {why}", reason="bad_file")


class SafetensorsReader(Mapping[str, torch.Tensor]):
    """A safetensors file as a read-only mapping of name -> tensor view, in file order."""

    def __init__(self, path: str | os.PathLike[str], *, skip_other_dtypes: bool = False) -> None:
        """``skip_other_dtypes``: list tensors of other dtypes (integers, bool, float64, ...) in ``skipped``
        (name -> dtype code) instead of refusing the file; an initial model may hold such buffers."""
        self.path = Path(path)
        self.skipped: dict[str, str] = {}
        self._skip_other_dtypes = skip_other_dtypes
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise _bad(self.path, f"{size} bytes")
            header_len = int.from_bytes(f.read(8), "little")
            if header_len > min(MAX_HEADER_BYTES, size - 8):
                raise _bad(self.path, f"header length {header_len}")
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise _bad(self.path, f"header is not JSON: {exc}") from None
            # ACCESS_COPY: a writable (copy-on-write, never written back) buffer, so torch views need no copy.
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self._data_start = 8 + header_len
        self.metadata, self.specs, self._begin = self._parse(header, size - self._data_start)

    def _parse(
        self, header: Any, data_bytes: int
    ) -> tuple[dict[str, str], dict[str, TensorSpec], dict[str, int]]:
        if not isinstance(header, dict):
            raise _bad(self.path, "header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise _bad(self.path, "__metadata__ must map strings to strings")
        entries: list[tuple[int, str, TensorSpec]] = []
        for name, entry in header.items():
            if self._skip_other_dtypes and isinstance(entry, dict) and entry.get("dtype") not in DTYPES:
                self.skipped[name] = str(entry.get("dtype"))
                continue
            try:
                dtype = DTYPES[entry["dtype"]]
                shape = tuple(int(d) for d in entry["shape"])
                begin, end = (int(o) for o in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise _bad(
                    self.path, f"tensor {name!r}: {entry!r:.200} (supported dtypes: F32, F16, BF16)"
                ) from None
            spec = TensorSpec(dtype, shape)
            if min(shape, default=0) < 0 or not 0 <= begin <= end <= data_bytes or end - begin != spec.nbytes:
                raise _bad(self.path, f"tensor {name!r}: offsets {begin}..{end} do not hold {shape} {dtype}")
            entries.append((begin, name, spec))
        entries.sort()
        return metadata, {n: s for _, n, s in entries}, {n: b for b, n, _ in entries}

    def __getitem__(self, name: str) -> torch.Tensor:
        spec = self.specs[name]
        if spec.numel == 0:
            return torch.empty(spec.shape, dtype=spec.dtype)
        offset = self._data_start + self._begin[name]
        return torch.frombuffer(self._map, dtype=spec.dtype, count=spec.numel, offset=offset).view(spec.shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    def release(self, name: str, offset: int, count: int) -> None:
        """Drop the mapped pages of elements ``offset .. offset+count`` of ``name`` from this process."""
        start, end = self._span(name, offset, count)
        first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # only whole pages inside the slice
        last = end // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first:
            self._map.madvise(mmap.MADV_DONTNEED, first, last - first)

    def stream(self, slices: Iterable[tuple[str, int, int]], held: int = 1) -> Iterator[torch.Tensor]:
        """Elements ``offset .. offset+count`` of each (name, offset, count), in order, read from disk.

        Reads bypass the page cache (O_DIRECT, where the file system allows it) into reused buffers, the next
        ``_READ_AHEAD`` slices read by background threads while the caller uses the ones it holds: faulting a
        file in through the map costs the kernel more CPU than the transfer (see ``SafetensorsWriter``), and
        the process holds ``_READ_AHEAD + held`` slices whatever the file's size. A yielded tensor is valid
        until ``held`` more have been asked for (a caller that encodes E slices at once holds E).
        """
        todo = list(slices)
        if not todo:
            return
        ranges = [self._range(*s) for s in todo]
        size = max(max(end - first for first, _, end in ranges), 1)
        buffers = [mmap.mmap(-1, size) for _ in range(_READ_AHEAD + max(1, held))]  # page-aligned
        fd = _open_direct(self.path)
        try:
            with ThreadPoolExecutor(_READ_AHEAD, thread_name_prefix="fedq-direct-read") as pool:
                reads: deque[Future[None]] = deque()
                for i in range(min(_READ_AHEAD, len(todo))):
                    reads.append(pool.submit(_read_range, fd, buffers[i], ranges[i]))
                for i, (name, _, count) in enumerate(todo):
                    reads.popleft().result()
                    ahead = i + _READ_AHEAD
                    if ahead < len(todo):  # into the buffer of slice i - held, which the caller is done with
                        buffer = buffers[ahead % len(buffers)]
                        reads.append(pool.submit(_read_range, fd, buffer, ranges[ahead]))
                    dtype = self.specs[name].dtype
                    if not count:
                        yield torch.empty(0, dtype=dtype)
                        continue
                    first, start, _ = ranges[i]
                    yield torch.frombuffer(
                        buffers[i % len(buffers)], dtype=dtype, count=count, offset=start - first
                    )
        finally:
            os.close(fd)

    def _range(self, name: str, offset: int, count: int) -> tuple[int, int, int]:
        """(block-aligned first byte, first byte, block-aligned end) in the file of a slice of ``name``."""
        spec = self.specs[name]
        if offset < 0 or count < 0 or offset + count > spec.numel:
            raise StreamError(
                f"{name}: slice {offset}+{count} outside {spec.shape}", reason="length_mismatch"
            )
        start, end = self._span(name, offset, count)
        return start - start % _BLOCK, start, -(-end // _BLOCK) * _BLOCK

    def _span(self, name: str, offset: int, count: int) -> tuple[int, int]:
        """The file's byte range [start, end) of elements ``offset .. offset+count`` of ``name``."""
        itemsize = self.specs[name].dtype.itemsize
        start = self._data_start + self._begin[name] + offset * itemsize
        return start, start + count * itemsize

    def close(self) -> None:
        """Unmap, unless tensor views are still alive (then the map goes with the last of them)."""
        with contextlib.suppress(BufferError):
            self._map.close()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def layout(specs: Mapping[str, TensorSpec], metadata: Mapping[str, str] | None = None) -> bytes:
    """The header bytes (length prefix included) for tensors laid out contiguously in the given order."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    begin = 0
    for name, spec in specs.items():
        header[name] = {
            "dtype": DTYPE_CODES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [begin, begin + spec.nbytes],
        }
        begin += spec.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)  # data starts 8-aligned, so every view over a map is aligned
    return len(text).to_bytes(8, "little") + text


class SafetensorsWriter:
    """Writes a safetensors file slice by slice into ``path + ".part"``; ``commit`` renames it into place.

    Slices that continue the previous one (a stream arrives in order) go through ``_DirectRun``: O_DIRECT
    writes of whole aligned blocks from a reused buffer, on a background thread. Buffered writes cost this
    kind of machine (a VM) about 1 s of kernel CPU per GB, measured 3.5-24 s for 5.9 GB, against 0.75 s with
    O_DIRECT; on a two-core machine that CPU is the broker's. The header, the unaligned edges of a run and
    out-of-order slices are written through the page cache; no block is written both ways. Where the file
    system refuses O_DIRECT (tmpfs), everything is buffered.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        specs: Mapping[str, TensorSpec],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.specs = dict(specs)
        head = layout(self.specs, metadata)
        self._begin: dict[str, int] = {}
        offset = len(head)
        for name, spec in self.specs.items():
            self._begin[name] = offset
            offset += spec.nbytes
        self.nbytes = offset
        self._part = self.path.with_name(self.path.name + ".part")
        self._fd = os.open(self._part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._run: _DirectRun | None = None
        try:
            if offset:
                os.posix_fallocate(
                    self._fd, 0, offset
                )  # fail now, not mid-transfer, when the disk is too small
            os.pwrite(self._fd, head, 0)
            self._run = _DirectRun.open(self._part, self._fd)
        except OSError:
            self.abort()
            raise

    def write(self, name: str, offset: int, values: torch.Tensor) -> None:
        """Write ``values`` (any float dtype; cast to the tensor's) as elements ``offset ..`` of ``name``."""
        spec = self.specs[name]
        if offset < 0 or offset + values.numel() > spec.numel:
            raise StreamError(
                f"{name}: slice {offset}+{values.numel()} outside {spec.shape}", reason="length_mismatch"
            )
        data = values.detach().reshape(-1).to("cpu", spec.dtype).contiguous()
        view = data.view(torch.uint8).numpy().data.cast("B")
        position = self._begin[name] + offset * spec.dtype.itemsize
        if self._run is not None:
            self._run.write(position, view)
        else:
            pwrite_all(self._fd, view, position)

    def commit(self) -> Path:
        """fsync, then rename into place: a reader never sees a half-written file under ``path``."""
        if self._run is not None:
            self._run.close()
            self._run = None
        os.fsync(self._fd)
        os.close(self._fd)
        os.replace(self._part, self.path)
        return self.path

    def abort(self) -> None:
        if self._run is not None:
            with contextlib.suppress(OSError):
                self._run.close()
            self._run = None
        os.close(self._fd)
        self._part.unlink(missing_ok=True)


def _open_direct(path: Path) -> int:
    """A read descriptor that bypasses the page cache where the file system allows it."""
    flag = getattr(os, "O_DIRECT", 0)
    try:
        return os.open(path, os.O_RDONLY | flag)
    except OSError:
        return os.open(path, os.O_RDONLY)


def _read_range(fd: int, buffer: mmap.mmap, span: tuple[int, int, int]) -> None:
    """Read the aligned byte range ``span`` of the file into the start of ``buffer`` (a short read at the end
    of the file leaves the rest of the buffer unused: the slice never reaches past the file's end)."""
    first, _, end = span
    view = memoryview(buffer)
    try:
        position = first
        while position < end:
            got = os.preadv(fd, [view[position - first : end - first]], position)
            if got == 0:
                break
            position += got
    finally:
        view.release()


class _DirectRun:
    """The current run of consecutive bytes, written with O_DIRECT in whole ``_BLOCK``-aligned buffers.

    ``_RUN_BUFFERS`` page-aligned buffers: one fills while background threads write the others
    (``os.pwrite`` releases the GIL; more than one write in flight keeps a virtual disk busy), so the disk
    works while the next chunks arrive. A write elsewhere than the run's end flushes the run (its unaligned
    tail through ``fd``, the page cache) and starts a new one, whose bytes up to the next block boundary also
    go through ``fd``.
    """

    def __init__(self, direct_fd: int, fd: int) -> None:
        self._direct, self._fd = direct_fd, fd
        self._buffers = [mmap.mmap(-1, _RUN_BUFFER) for _ in range(_RUN_BUFFERS)]  # page-aligned
        self._current = 0
        self._start = -1  # file position of the current buffer's first byte (block-aligned); -1: no run
        self._filled = 0
        self._pool = ThreadPoolExecutor(_RUN_BUFFERS - 1, thread_name_prefix="fedq-direct-write")
        self._pending: deque[Future[None]] = deque()  # in submission order, one per buffer in flight

    @classmethod
    def open(cls, path: Path, fd: int) -> _DirectRun | None:
        flag = getattr(os, "O_DIRECT", None)
        if flag is None:
            return None
        try:
            return cls(os.open(path, os.O_WRONLY | flag), fd)
        except OSError:  # the file system does not support O_DIRECT
            return None

    def write(self, position: int, view: memoryview) -> None:
        if self._start < 0 or position != self._start + self._filled:
            self._flush_tail()
            head = min(len(view), -position % _BLOCK)
            pwrite_all(self._fd, view[:head], position)
            view, position = view[head:], position + head
            self._start, self._filled = position, 0
            if not len(view):
                self._start = -1
                return
        while len(view):
            n = min(len(view), _RUN_BUFFER - self._filled)
            buffer = self._buffers[self._current]
            buffer[self._filled : self._filled + n] = view[:n]
            self._filled += n
            view = view[n:]
            if self._filled == _RUN_BUFFER:
                self._submit(_RUN_BUFFER)
                self._start += _RUN_BUFFER
                self._filled = 0

    def _submit(self, nbytes: int) -> None:
        """Write the current buffer's first ``nbytes`` (whole blocks) at the run's start, on the thread."""
        buffer = memoryview(self._buffers[self._current])[:nbytes]
        self._pending.append(self._pool.submit(pwrite_all, self._direct, buffer, self._start))
        self._current = (self._current + 1) % len(self._buffers)
        while len(self._pending) >= len(self._buffers):  # the oldest write holds the buffer filled next
            self._pending.popleft().result()

    def _wait(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def _flush_tail(self) -> None:
        if self._start < 0:
            return
        whole = self._filled - self._filled % _BLOCK
        tail = memoryview(self._buffers[self._current])[whole : self._filled]
        if whole:
            self._submit(whole)
        pwrite_all(self._fd, tail, self._start + whole)
        tail.release()
        self._start, self._filled = -1, 0

    def close(self) -> None:
        try:
            self._flush_tail()
            self._wait()
        finally:
            self._pool.shutdown()
            os.close(self._direct)


def save_file(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a state dict, tensor by tensor (tests and benchmarks make their input files with it)."""
    writer = SafetensorsWriter(
        path, {n: TensorSpec(t.dtype, tuple(t.shape)) for n, t in tensors.items()}, metadata
    )
    try:
        for name, t in tensors.items():
            writer.write(name, 0, t)
    except BaseException:
        writer.abort()
        raise
    return writer.commit()

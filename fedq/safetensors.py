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
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch

from fedq.errors import StreamError

DTYPES: dict[str, torch.dtype] = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100 << 20  # the reference implementation's bound


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

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
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
        spec = self.specs[name]
        start = self._data_start + self._begin[name] + offset * spec.dtype.itemsize
        end = start + count * spec.dtype.itemsize
        first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # only whole pages inside the slice
        last = end // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first:
            self._map.madvise(mmap.MADV_DONTNEED, first, last - first)

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
    """Writes a safetensors file slice by slice into ``path + ".part"``; ``commit`` renames it into place."""

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
        try:
            if offset:
                os.posix_fallocate(
                    self._fd, 0, offset
                )  # fail now, not mid-transfer, when the disk is too small
            os.pwrite(self._fd, head, 0)
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
        view = data.view(torch.uint8).numpy().data
        position = self._begin[name] + offset * spec.dtype.itemsize
        while len(view):
            written = os.pwrite(self._fd, view, position)
            view, position = view[written:], position + written

    def commit(self) -> Path:
        """fsync, then rename into place: a reader never sees a half-written file under ``path``."""
        os.fsync(self._fd)
        os.close(self._fd)
        os.replace(self._part, self.path)
        return self.path

    def abort(self) -> None:
        os.close(self._fd)
        self._part.unlink(missing_ok=True)


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

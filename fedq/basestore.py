"""The version a client received, kept on disk: the base its next update is the difference to.

A client must remember the version it received (``send`` sends ``local - base``). In memory that is a second
model (Llama-3.2-1B in fp32: 5.7 GB more). Here it is an unlinked temporary file (gone when the client closes
or dies) in the model's dtypes, written chunk by chunk while a version downloads and read back in slices:
when the version is complete it is copied into the model (so a receive stays atomic: the model is not touched
before the whole version is in hand), and at ``send`` each chunk's delta is computed in the buffer its base is
read into.
Written pages go through the page cache, which the kernel can drop; they are not the process's memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from fedq import scratch
from fedq.device import host_buffer
from fedq.fileio import bytes_of, pread_into, pwrite_all
from fedq.safetensors import SafetensorsWriter, TensorSpec

_ROUND_STEP = 1 << 20  # elements converted to or from a model's dtype at a time (4 MiB temporaries)
_SAVE_STEP = 1 << 24  # elements copied into a file at a time (64 MiB of float32)


class BaseStore(Mapping[str, torch.Tensor]):
    """Tensors by name in one file; ``store[name]`` reads a fresh copy. Names are reserved before written."""

    def __init__(self, directory: str | None = None) -> None:
        self._directory = scratch.directory(directory)
        self._file = scratch.temporary_file(self._directory)
        self._fd = self._file.fileno()
        self._index: dict[str, tuple[int, torch.dtype, tuple[int, ...]]] = {}  # name -> (byte offset, ...)
        self._end = 0
        self._kept: set[str] | None = None  # the names a Mapping view shows (None: all)

    def reserve(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        """Room for tensor ``name`` (once): its chunks are then written with ``write``."""
        self._index[name] = (self._end, dtype, tuple(shape))
        self._end += math.prod(shape) * _itemsize(dtype)

    def reserved(self, name: str) -> tuple[torch.dtype, tuple[int, ...]] | None:
        entry = self._index.get(name)
        return None if entry is None else (entry[1], entry[2])

    def write(self, name: str, offset: int, values: torch.Tensor) -> None:
        """Elements ``offset ..`` of tensor ``name``, cast to its dtype."""
        start, dtype, _ = self._index[name]
        data = values.detach().to("cpu", dtype).contiguous().view(-1).view(torch.uint8).numpy()
        with scratch.writing(self._directory):
            pwrite_all(self._fd, bytes_of(data), start + offset * _itemsize(dtype))

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Tensor ``name`` into ``out`` (same shape; converted where its dtype or device differ)."""
        start, dtype, _ = self._index[name]
        target = out.detach()
        if target.device.type == "cpu" and target.dtype == dtype and target.is_contiguous():
            pread_into(self._fd, bytes_of(target.view(-1).view(torch.uint8).numpy()), start)
        elif target.is_contiguous():  # converted a slice at a time: no tensor-sized temporary
            flat = target.view(-1)
            for lo in range(0, flat.numel(), _ROUND_STEP):
                piece = flat[lo : lo + _ROUND_STEP]
                piece.copy_(self.read_slice(name, lo, piece.numel()))
        else:
            target.copy_(self.read(name))

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A fresh tensor with the stored values (on the CPU, as ``dtype`` if given)."""
        start, stored, shape = self._index[name]
        out = torch.empty(shape, dtype=stored)
        pread_into(self._fd, bytes_of(out.view(-1).view(torch.uint8).numpy()), start)
        return out if dtype is None or dtype == stored else out.to(dtype)

    def read_slice(self, name: str, offset: int, count: int) -> torch.Tensor:
        """Elements ``offset .. offset+count`` of the flattened tensor, fresh, in its stored dtype."""
        start, dtype, _ = self._index[name]
        out = torch.empty(count, dtype=dtype)
        pread_into(self._fd, bytes_of(out.view(torch.uint8).numpy()), start + offset * _itemsize(dtype))
        return out

    def delta(self, name: str, local: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """``local - stored`` in float32 on local's device (local's shape), where ``local`` holds elements
        ``offset ..`` of the flattened tensor: the whole tensor, or one chunk of it (a sender computes its
        delta a chunk at a time: ``LazyTensors.slicer``).

        The stored values are first rounded to ``local``'s dtype, as the model received them: a bf16 model
        that received float32 values (x̂, ``fedq.reconstruction``) holds their rounding, which is no update.
        On the CPU this is computed in the one buffer the stored values are read into, a megabyte slice at a
        time (a bf16 ``local`` minus float32 values in one op makes a float32 copy of ``local`` first); on a
        GPU the stored bytes are read into a pinned buffer and copied over asynchronously, and rounded there,
        so only these elements' base crosses, never the model.
        """
        if local.device.type != "cpu":
            return self._delta_on_device(name, local, offset)
        flat = local.detach().reshape(-1)
        base = self.read_slice(name, offset, flat.numel()).to(torch.float32)
        for lo in range(0, flat.numel(), _ROUND_STEP):
            piece = base[lo : lo + _ROUND_STEP]
            if local.dtype != torch.float32:
                piece.copy_(piece.to(local.dtype))
            torch.sub(flat[lo : lo + _ROUND_STEP], piece, out=piece)
        return base.view(local.shape)

    def _delta_on_device(self, name: str, local: torch.Tensor, offset: int) -> torch.Tensor:
        start, stored, _ = self._index[name]
        host = host_buffer(local.numel() * _itemsize(stored))
        pread_into(self._fd, bytes_of(host.numpy()), start + offset * _itemsize(stored))
        base = host.view(stored).view(local.shape).to(local.device, non_blocking=True)
        base = base.to(local.dtype).to(torch.float32)  # rounded as the model received them
        return torch.sub(local.detach(), base, out=base)  # base is this call's own device copy

    def save(self, path: Path, metadata: Mapping[str, str]) -> None:
        """Every tensor into the safetensors file ``path`` (it appears only when complete), a slice at a time:
        a model larger than memory goes through (``fedq receive``)."""
        specs = {name: TensorSpec(dtype, shape) for name, (_, dtype, shape) in self._index.items()}
        writer = SafetensorsWriter(path, specs, metadata)
        try:
            for name, spec in specs.items():
                for lo in range(0, spec.numel, _SAVE_STEP):
                    writer.write(name, lo, self.read_slice(name, lo, min(_SAVE_STEP, spec.numel - lo)))
        except BaseException:
            writer.abort()
            raise
        writer.commit()

    def keep(self, names: set[str]) -> None:
        """Show only ``names`` from now on (the tensors ``send`` may send); the others stay in the file."""
        self._kept = set(names)

    def close(self) -> None:
        self._file.close()

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._index or (self._kept is not None and name not in self._kept):
            raise KeyError(name)
        return self.read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(n for n in self._index if self._kept is None or n in self._kept)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()

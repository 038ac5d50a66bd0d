"""The clients' reconstruction x̂ of the global model, when versions travel as quantized deltas.

With ``--model-codec int8`` or ``nf4`` (any codec below 16 bits) a version is never sent whole in that codec:
a 4- or 8-bit copy of the weights would replace them by their rounding. Version v travels as
``Q(x_v − x̂_{v−1})`` and every party computes ``x̂_v = x̂_{v−1} + Q⁻¹(Q(x_v − x̂_{v−1}))`` (``advance``): the
same decoded payload added to the same float32 values with the same float32 addition, so every client holds
x̂_v bit for bit what the aggregator holds. The aggregator keeps x_v itself exact; what the quantization
dropped (x_v − x̂_v) is in the next delta. That is error feedback by construction: the gap between x̂ and x
is one version's rounding, never a sum of them.

- **Frozen tensors do not travel.** A tensor whose delta is exactly zero (x_v equals x̂_{v−1} bit for bit:
  a frozen base) is left out of the delta; clients keep its value. Snapshots are exact (x̂ in fp32, below),
  so a tensor that never changes never travels again after a client's first download.
- **Snapshots** of x̂ in fp32 (lossless: x̂ is what clients must hold exactly) are published at version 0
  and every ``snapshot_every`` versions, after that version's delta. A client that holds no version, or one
  too old for the deltas still announced, reads the newest snapshot and the deltas since.

The aggregator keeps x̂ on disk, not in memory: one safetensors file of float32 tensors per version in each
shard's state directory (``recon-v{v}.safetensors``). Version v's file starts as a copy of version v−1's; the
changed chunks are written into it while the delta is encoded; it is renamed into place before the state that
names version v as published is committed, and the previous file is deleted only after that. Killed at any
point, a shard publishes version v again from x̂_{v−1}: the codecs are deterministic, so the bytes are the
same and clients that read either publication hold the same x̂.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from fedq.codecs import ErrorFeedback, get_codec
from fedq.fileio import pread_into, pwrite_all
from fedq.safetensors import SafetensorsReader, SafetensorsWriter, TensorSpec, layout
from fedq.topology import models_retention_bytes

SNAPSHOT_CODEC = "fp32"
_COMPARE_STEP = 1 << 22  # elements compared at a time when looking for unchanged tensors (16 MiB of float32)


def is_delta_codec(name: str) -> bool:
    """Whether versions in this model codec travel as deltas against x̂ (codecs below 16 bits per element)."""
    n = 1 << 16
    return get_codec(name).payload_nbytes(n) * 8 / n < 16


def advance(previous: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
    """x̂_v of one chunk, in place: x̂_{v−1} + the decoded delta, in float32 on the CPU.

    The one definition the aggregator and every client use, so that they agree bit for bit.
    """
    return torch.add(previous, decoded.to("cpu"), out=previous)


def file_name(version: int) -> str:
    return f"recon-v{version}.safetensors"


class Reconstruction:
    """x̂ of one shard's tensors, one file per version in ``directory``."""

    def __init__(self, directory: Path, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.dir = directory
        self.specs = {name: TensorSpec(torch.float32, tuple(shape)) for name, shape in shapes.items()}
        position = len(layout(self.specs))
        self._begin: dict[str, int] = {}
        for name, spec in self.specs.items():  # SafetensorsWriter lays the tensors out in this order
            self._begin[name] = position
            position += spec.nbytes

    def path(self, version: int) -> Path:
        return self.dir / file_name(version)

    def has(self, version: int) -> bool:
        return self.path(version).exists()

    def reset(self, version: int, model: Mapping[str, torch.Tensor]) -> None:
        """x̂_v = x_v exactly (version 0, or a shard without x̂_{v−1}): published as a snapshot only."""
        writer = SafetensorsWriter(self.path(version), self.specs)
        try:
            for name in self.specs:
                writer.write(name, 0, model[name])
        except BaseException:
            writer.abort()
            raise
        writer.commit()

    def step(self, version: int) -> ReconstructionStep:
        """The step from x̂_{version−1} to x̂_{version}, to be passed as the delta's error feedback."""
        return ReconstructionStep(self.path(version - 1), self.path(version), self._begin)

    def reader(self, version: int) -> SafetensorsReader:
        """x̂ of ``version`` as a mapping whose slices stream from disk (a snapshot's source)."""
        return SafetensorsReader(self.path(version))

    def prune(self, current: int) -> None:
        """Delete the files of versions before ``current`` and any unfinished one (after ``current`` is
        committed as published: a restart never needs them again)."""
        for path in self.dir.glob("recon-v*.safetensors*"):
            found = re.fullmatch(r"recon-v(\d+)\.safetensors", path.name)
            if found is None or int(found[1]) < current:
                path.unlink(missing_ok=True)


class ReconstructionStep(ErrorFeedback):
    """The delta of one version as error feedback on the sender: ``compensate`` turns a chunk of x_v into
    the chunk of x_v − x̂_{v−1} to encode, ``update`` writes x̂_{v−1} + decode(payload) into x̂_v's file.

    Chunks touch disjoint byte ranges (positional reads and writes), so encoder threads share one step.
    """

    def __init__(self, previous: Path, new: Path, begin: Mapping[str, int]) -> None:
        super().__init__()
        self._begin = begin
        self._new = new
        self._part = new.with_name(new.name + ".part")
        shutil.copyfile(previous, self._part)  # in the kernel; unchanged tensors stay as they were
        self._old_fd = os.open(previous, os.O_RDONLY)
        self._new_fd = os.open(self._part, os.O_RDWR)

    def previous(self, name: str, offset: int, count: int) -> torch.Tensor:
        """x̂_{v−1} of elements ``offset .. offset+count`` of ``name``: a fresh float32 tensor."""
        out = torch.empty(count, dtype=torch.float32)
        if count:
            pread_into(self._old_fd, _bytes(out), self._begin[name] + 4 * offset)
        return out

    def changed(self, name: str, x: torch.Tensor) -> bool:
        """Whether x_v differs from x̂_{v−1} in any bit (compared a slice at a time)."""
        flat = x.detach().reshape(-1)
        for lo in range(0, flat.numel(), _COMPARE_STEP):
            piece = flat[lo : lo + _COMPARE_STEP]
            if not torch.equal(piece.to("cpu", torch.float32), self.previous(name, lo, piece.numel())):
                return True
        return False

    def compensate(self, name: str, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        previous = self.previous(name, offset, x.numel())
        return torch.sub(x.detach().to("cpu", torch.float32).reshape(-1), previous, out=previous)

    def update(self, name: str, sent: torch.Tensor, decoded: torch.Tensor, offset: int = 0) -> None:
        values = advance(self.previous(name, offset, decoded.numel()), decoded)
        pwrite_all(self._new_fd, _bytes(values), self._begin[name] + 4 * offset)

    def commit(self) -> None:
        """Make x̂_v durable under its name (the state that names the version as published comes after)."""
        os.fsync(self._new_fd)
        self.close()
        os.replace(self._part, self._new)

    def close(self) -> None:
        for fd in (self._old_fd, self._new_fd):
            with contextlib.suppress(OSError):
                os.close(fd)

    def abort(self) -> None:
        self.close()
        self._part.unlink(missing_ok=True)


def retention_bytes(model_bytes: int, codec: str, snapshot_every: int) -> int:
    """The models stream's byte limit for a model of ``model_bytes`` (fp32) whose versions travel in
    ``codec``: two whole versions; with versions as deltas, two snapshots and the announced deltas plus the
    one being written. From the model's size alone, so that the aggregator's shards and ``fedq broker
    definitions --model-size`` declare the same figure (1-D tensors, which stay fp32, are counted at the
    codec's size: at most a few kB per version, well inside each delta's segment of slack)."""
    if not is_delta_codec(codec):
        return models_retention_bytes(model_bytes)
    delta = get_codec(codec).payload_nbytes(model_bytes // 4)
    return models_retention_bytes(model_bytes, delta, snapshot_every + 1)


def _bytes(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory."""
    return t.view(torch.uint8).numpy().data.cast("B")

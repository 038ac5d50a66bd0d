"""Atomic checkpoints of one shard: its part of the global model plus a small state JSON.

The model of version v goes to ``model-v{v}.safetensors`` (written tensor by tensor to a temporary name,
fsynced, renamed), then ``state.json`` is replaced the same way and names that file: the rename of
``state.json`` is the single commit point, so a crash at any moment leaves either the old or the new
checkpoint, never a mix. Older model files are deleted only after the new state is durable.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from fedq.safetensors import SafetensorsReader, SafetensorsWriter, TensorSpec

STATE = "state.json"


def save(directory: Path, version: int, model: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    """Write the model of ``version`` and ``state`` (JSON-able) atomically; ``state`` gains
    ``version``/``model``."""
    directory.mkdir(parents=True, exist_ok=True)
    model_name = f"model-v{version}.safetensors"
    if not (directory / model_name).exists():
        writer = SafetensorsWriter(
            directory / model_name, {n: TensorSpec(torch.float32, tuple(t.shape)) for n, t in model.items()}
        )
        try:
            for name, t in model.items():
                writer.write(name, 0, t)
        except BaseException:
            writer.abort()
            raise
        writer.commit()
    write_state(directory, {**state, "version": version, "model": model_name})
    for old in directory.glob("model-v*.safetensors"):
        if old.name != model_name:
            old.unlink(missing_ok=True)


def write_state(directory: Path, state: dict[str, Any]) -> None:
    """Replace ``state.json`` atomically (also used between model versions, e.g. to record a publication)."""
    tmp = directory / (STATE + ".tmp")
    tmp.write_text(json.dumps(state, sort_keys=True))
    _fsync_file(tmp)
    os.replace(tmp, directory / STATE)
    _fsync_file(directory)


def load(directory: Path, device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The last committed checkpoint (model on ``device``, state), or None when there is none."""
    try:
        state = json.loads((directory / STATE).read_text())
    except FileNotFoundError:
        return None
    return read_model(directory / state["model"], device), state


def read_model(path: Path, device: torch.device, names: set[str] | None = None) -> dict[str, torch.Tensor]:
    """float32 copies on ``device`` of the tensors in ``names`` (all when None) of a safetensors file or a
    torch
    state-dict file, read one tensor at a time so that only the copies stay resident."""
    out: dict[str, torch.Tensor] = {}
    if path.suffix == ".safetensors":
        with SafetensorsReader(path) as reader:
            for name in reader:
                if names is None or name in names:
                    out[name] = _copy_released(reader, name, device)
        return out
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    for name, t in state.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and (names is None or name in names):
            out[name] = t.to(device=device, dtype=torch.float32, copy=True)
    return out


_COPY_STEP = 1 << 22  # elements per slice of a tensor copied out of a mapped file


def _copy_released(reader: SafetensorsReader, name: str, device: torch.device) -> torch.Tensor:
    """A float32 copy of one mapped tensor, slice by slice, each slice's file pages dropped once copied: the
    load never holds more than one slice of the file next to the copies (a large embedding is ~150 MiB)."""
    spec = reader.specs[name]
    src = reader[name].reshape(-1)
    out = torch.empty(spec.numel, dtype=torch.float32, device=device)
    for lo in range(0, spec.numel, _COPY_STEP):
        hi = min(lo + _COPY_STEP, spec.numel)
        out[lo:hi].copy_(src[lo:hi])
        reader.release(name, lo, hi - lo)
    return out.view(spec.shape)


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every float tensor's shape in a model file, without loading the tensors."""
    if path.suffix == ".safetensors":
        with SafetensorsReader(path) as reader:
            return {name: spec.shape for name, spec in reader.specs.items()}
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return {
        n: tuple(t.shape) for n, t in state.items() if isinstance(t, torch.Tensor) and t.is_floating_point()
    }


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

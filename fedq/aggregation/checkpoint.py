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

from fedq.aggregation import initial
from fedq.safetensors import SafetensorsWriter, TensorSpec

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
    return initial.read_model(directory / state["model"], device), state


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

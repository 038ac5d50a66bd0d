"""Atomic checkpoints of one shard: its part of the global model plus a small state JSON.

The model of version v goes to ``model-v{v}.safetensors`` (written tensor by tensor to a temporary name,
fsynced, renamed), with its record ``model-v{v}.json`` (who contributed, how it was aggregated: what
``fedq export`` writes into the file's metadata), then ``state.json`` is replaced the same way and names that
file: the rename of ``state.json`` is the single commit point, so a crash at any moment leaves either the old
or the new checkpoint, never a mix. The newest ``keep`` versions stay on disk (``fedq export --version N``);
older ones are deleted only after the new state is durable.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from fedq.aggregation import initial
from fedq.errors import StateError
from fedq.safetensors import SafetensorsWriter, TensorSpec

STATE = "state.json"


def save(
    directory: Path,
    version: int,
    model: dict[str, torch.Tensor],
    state: dict[str, Any],
    *,
    record: dict[str, Any] | None = None,
    keep: int = 1,
) -> None:
    """Write the model of ``version`` (with its ``record``, JSON-able) and ``state`` (JSON-able) atomically;
    ``state`` gains ``version``/``model``. Keeps the newest ``keep`` versions' files."""
    directory.mkdir(parents=True, exist_ok=True)
    model_name = model_file(version)
    if record is not None and not (directory / record_file(version)).exists():
        _write_atomically(directory / record_file(version), json.dumps(record, sort_keys=True))
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
    for old in versions(directory)[: -max(1, keep)]:
        (directory / model_file(old)).unlink(missing_ok=True)
        (directory / record_file(old)).unlink(missing_ok=True)


def model_file(version: int) -> str:
    return f"model-v{version}.safetensors"


def record_file(version: int) -> str:
    return f"model-v{version}.json"


def versions(directory: Path) -> list[int]:
    """The versions whose model file is on disk, oldest first."""
    found = (
        re.fullmatch(r"model-v(\d+)\.safetensors", p.name) for p in directory.glob("model-v*.safetensors")
    )
    return sorted(int(m[1]) for m in found if m)


def read_record(directory: Path, version: int) -> dict[str, Any]:
    """The record of a version on disk ({} for one written before records existed)."""
    try:
        return read_json(directory / record_file(version))
    except FileNotFoundError:
        return {}


def read_state(directory: Path) -> dict[str, Any] | None:
    """The committed state JSON, without loading the model (None for a fresh shard)."""
    try:
        return read_json(directory / STATE, "shard", "shards", "model")
    except FileNotFoundError:
        return None


def write_state(directory: Path, state: dict[str, Any]) -> None:
    """Replace ``state.json`` atomically (also used between model versions, e.g. to record a publication)."""
    _write_atomically(directory / STATE, json.dumps(state, sort_keys=True))


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    _fsync_file(tmp)
    os.replace(tmp, path)
    _fsync_file(path.parent)


def load(directory: Path, device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The last committed checkpoint (model on ``device``, state), or None when there is none."""
    state = read_state(directory)
    if state is None:
        return None
    return initial.read_model(directory / state["model"], device), state


def read_json(path: Path, *keys: str) -> dict[str, Any]:
    """A JSON object fedq wrote into a state directory, with ``keys``; a StateError where it is not one (a
    crash cannot leave such a file: every one is replaced atomically)."""
    try:
        value = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise StateError(f"{path}: not the JSON fedq wrote there ({exc})") from None
    if not isinstance(value, dict) or (missing := [k for k in keys if k not in value]):
        raise StateError(
            f"{path}: not an aggregator's state (no {missing if isinstance(value, dict) else keys})"
        )
    return value


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

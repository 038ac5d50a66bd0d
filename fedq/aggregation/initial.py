"""Models the aggregator reads from disk: ``--init`` (version 0) in the forms users have one, checkpoints.

Accepted forms of ``--init``:

- a safetensors file (fedq's own checkpoints are these too);
- a torch state-dict file (``torch.save(model.state_dict())``, ``.pt``/``.bin``): tied weights are one
  storage there and are kept once, under their first name;
- a Hugging Face ``save_pretrained`` directory: ``model.safetensors``, the shards that
  ``model.safetensors.index.json`` lists, or ``pytorch_model.bin``. When its ``config.json`` ties the word
  embeddings (``tie_word_embeddings``, Hugging Face's default), an ``lm_head.weight`` that is bit-identical to
  exactly one other tensor of its shape is recognised as that tensor's alias and not held twice
  (``save_pretrained`` already writes it once);
- a PEFT adapter directory (``adapter_model.safetensors`` or ``adapter_model.bin``, from a ``PeftModel``'s
  ``save_pretrained``): the adapter's tensors under their saved names (without ``.default``), which clients'
  ``PeftModel``\\ s match (``fedq.binding``).

The global model holds each tensor once, in float32. Integer and bool tensors (position ids, counters) are
not federated: they are left out, the same way from every form, and logged. float64 tensors are refused (the
wire carries float32, float16 and bfloat16): convert the model first. Tensors are read one at a time, so only
the float32 copies stay resident.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedq.binding import alias_groups
from fedq.errors import ConfigError
from fedq.safetensors import DTYPES, SafetensorsReader

log = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
# files a directory is read from, in order of preference
DIRECTORY_FILES = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors", "adapter_model.bin")
TIED_HEAD = "lm_head.weight"
_COPY_STEP = 1 << 22  # elements per slice of a tensor copied out of a mapped file


@dataclass
class ModelFiles:
    """Where each federated tensor of a model on disk lives, and what was left out and why."""

    files: dict[str, Path] = field(default_factory=dict)  # tensor -> the file holding it
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # alias left out -> the tensor it is
    skipped: dict[str, str] = field(default_factory=dict)  # not federated: tensor -> its dtype

    def describe(self) -> str:
        parts = [f"{len(self.shapes)} tensors from {len(set(self.files.values()))} file(s)"]
        if self.aliases:
            parts.append("tied: " + ", ".join(f"{a} = {t}" for a, t in sorted(self.aliases.items())))
        if self.skipped:
            parts.append(f"not federated (integer/bool, each client keeps its own): {sorted(self.skipped)}")
        return "; ".join(parts)


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every federated tensor's shape, without loading the tensors; logs what was tied or left out."""
    model = locate(path)
    log.info("model %s: %s", path, model.describe())
    return model.shapes


def read_model(path: Path, device: torch.device, names: set[str] | None = None) -> dict[str, torch.Tensor]:
    """float32 copies on ``device`` of the federated tensors in ``names`` (all when None), one at a time."""
    model = locate(path)
    wanted = [n for n in model.shapes if names is None or n in names]
    out: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name in wanted:
        by_file.setdefault(model.files[name], []).append(name)
    for file, file_names in by_file.items():
        if _is_safetensors(file):
            with SafetensorsReader(file, skip_other_dtypes=True) as reader:
                for name in file_names:
                    out[name] = _copy_released(reader, name, device)
        else:
            state = _torch_state(file)
            for name in file_names:
                out[name] = state[name].to(device=device, dtype=torch.float32, copy=True)
    return {name: out[name] for name in wanted}


def locate(path: Path) -> ModelFiles:
    """The tensors of the model at ``path`` (a file or a directory, see the module docstring)."""
    if path.is_dir():
        files = _directory_files(path)
        tie_head = _ties_embeddings(path / "config.json")
    elif path.is_file():
        files, tie_head = [path], False
    else:
        raise ConfigError(f"--init {path}: no such file or directory")
    model = ModelFiles()
    for file in files:
        _add_file(model, file)
    if tie_head:
        _tie_head(model)
    if not model.shapes:
        raise ConfigError(f"--init {path}: no float32/float16/bfloat16 tensor in {[str(f) for f in files]}")
    return model


def _directory_files(directory: Path) -> list[Path]:
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            return [directory / name for name in dict.fromkeys(weight_map.values())]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"{index}: not a safetensors index ({exc!r})") from None
    for name in DIRECTORY_FILES:
        if (directory / name).is_file():
            return [directory / name]
    raise ConfigError(
        f"--init {directory}: a directory needs {SAFETENSORS_INDEX} or one of {list(DIRECTORY_FILES)} "
        "(what save_pretrained writes for a transformers model or a PEFT adapter)"
    )


def _ties_embeddings(config: Path) -> bool:
    """Whether a Hugging Face config ties the output head to the input embeddings (its default: yes)."""
    if not config.is_file():
        return False
    try:
        settings = json.loads(config.read_text())
    except ValueError as exc:
        raise ConfigError(f"{config}: not JSON ({exc})") from None
    return bool(settings.get("tie_word_embeddings", True)) if isinstance(settings, dict) else False


def _add_file(model: ModelFiles, file: Path) -> None:
    if not file.is_file():
        raise ConfigError(f"--init: {file} is missing (listed in {SAFETENSORS_INDEX}?)")
    if _is_safetensors(file):
        with SafetensorsReader(file, skip_other_dtypes=True) as reader:
            shapes = {name: spec.shape for name, spec in reader.specs.items()}
            skipped = dict(reader.skipped)
        if wide := sorted(n for n, code in skipped.items() if code == "F64"):
            raise _float64(file, wide)
    else:
        state = _torch_state(file)
        shapes, skipped = {}, {}
        for name, tensor in state.items():
            if tensor.dtype in DTYPES.values():
                shapes[name] = tuple(tensor.shape)
            elif tensor.is_floating_point() or tensor.is_complex():
                raise _float64(file, [name])
            else:
                skipped[name] = str(tensor.dtype)
        for group in alias_groups({n: state[n] for n in shapes}):
            for alias in group[1:]:
                model.aliases[alias] = group[0]
                del shapes[alias]
    for name, shape in shapes.items():
        if name in model.files:
            raise ConfigError(f"--init: tensor {name!r} is in both {model.files[name]} and {file}")
        model.files[name] = file
        model.shapes[name] = shape
    model.skipped.update(skipped)


def _tie_head(model: ModelFiles) -> None:
    """Leave out each ``lm_head.weight`` that is bit-identical to exactly one other tensor of its shape."""
    for head in [n for n in model.shapes if n == TIED_HEAD or n.endswith("." + TIED_HEAD)]:
        others = [n for n, s in model.shapes.items() if n != head and s == model.shapes[head]]
        with ExitStack() as stack:
            tensors = _TensorsOf(model, stack)
            same = [n for n in others if torch.equal(tensors[n], tensors[head])]
        if len(same) == 1:
            model.aliases[head] = same[0]
            del model.shapes[head], model.files[head]
        else:
            log.warning(
                "%s: the config ties word embeddings, but %s matches %d tensors", head, head, len(same)
            )


class _TensorsOf(Mapping[str, torch.Tensor]):
    """Tensors of a ``ModelFiles`` read on demand (files stay open for the ``stack``'s life)."""

    def __init__(self, model: ModelFiles, stack: ExitStack) -> None:
        self.model = model
        self.stack = stack
        self.open: dict[Path, Mapping[str, torch.Tensor]] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        file = self.model.files[name]
        if file not in self.open:
            self.open[file] = (
                self.stack.enter_context(SafetensorsReader(file, skip_other_dtypes=True))
                if _is_safetensors(file)
                else _torch_state(file)
            )
        return self.open[file][name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.model.files)

    def __len__(self) -> int:
        return len(self.model.files)


def _torch_state(file: Path) -> dict[str, torch.Tensor]:
    """A flat torch state dict, memory-mapped (tensors are paged in only when copied)."""
    try:
        state: Any = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises many types for a file that is not one of its own
        raise ConfigError(f"{file}: neither safetensors nor a torch state dict ({exc!r:.200})") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise ConfigError(f"{file}: not a flat state dict of tensors (save model.state_dict() itself)")
    return state


def _is_safetensors(file: Path) -> bool:
    return file.suffix == ".safetensors"


def _float64(file: Path, names: list[str]) -> ConfigError:
    return ConfigError(
        f"{file}: {names[:5]} are float64; fedq federates float32, float16 and bfloat16 tensors "
        "(convert the model, e.g. model.float(), and save it again)"
    )


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

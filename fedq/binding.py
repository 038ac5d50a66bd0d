"""How a user's model lines up with the global model: one model tensor per global name, or a clear refusal.

The global model (what the aggregator holds and announces) names each tensor once. A user's model may name
the same tensor differently, and each difference is resolved here, before anything is sent or written:

- **Tied and shared tensors.** A state dict lists a tied weight under every alias (GPT-2's
  ``transformer.wte.weight`` and ``lm_head.weight`` are one tensor). Aliases are recognised by their storage
  (same memory, offset, shape and strides), travel once under the name the global has, and a write lands in
  every alias because they share memory. A global that holds two aliases as separate tensors is refused: the
  receive would write both into one storage and keep only the last.
- **Wrapper prefixes.** ``torch.compile`` wraps a module as ``_orig_mod``, ``DataParallel`` and
  ``DistributedDataParallel`` as ``module``; modules are unwrapped, and in a plain state dict those prefixes
  are ignored where the exact name is not in the global.
- **PEFT adapter names.** A ``PeftModel`` names its adapter tensors ``...lora_A.default.weight`` and its
  trained copies of whole modules ``...lm_head.modules_to_save.default.weight``; its ``save_pretrained``
  writes ``...lora_A.weight`` and ``...lm_head.weight``. Where the exact name is not in the global, path
  segments equal to an adapter name (the model's ``peft_config`` keys, else ``default``) and
  ``modules_to_save`` and ``base_layer`` (the layer a LoRA wraps) are ignored. DoRA's magnitude is
  ``...lora_magnitude_vector.default.weight`` in the model and ``...lora_magnitude_vector`` in the saved
  adapter (PEFT keeps its old checkpoint format).
- **What does not travel.** Integer and bool tensors (position ids, step counters) are never federated: they
  stay as each client has them (the aggregator drops them from an initial model too). float64 tensors are
  refused: the wire and the aggregator carry float32, float16 and bfloat16.

No other rewriting happens: a name that still matches nothing is reported with these hints, never dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from fedq.errors import ConfigError

FEDERATED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
WRAPPER_SEGMENTS = ("_orig_mod", "module")
# ignored anywhere in a name: torch.compile's wrapper, PEFT's trained copy of a module (``modules_to_save``),
# the layer a LoRA wraps (``base_layer``: a PeftModel adapting more modules than the global's still matches
# the base weights, and its extra adapters are named as such)
IGNORED_SEGMENTS = frozenset({"_orig_mod", "modules_to_save", "base_layer"})
DEFAULT_ADAPTERS = frozenset({"default"})
# PEFT saves DoRA's magnitude (a Linear's ``.weight`` in the model) without the ``.weight``
DORA_MAGNITUDE = ("lora_magnitude_vector", "weight")
PEFT_PREFIX = "base_model.model."  # a PeftModel's names for its base model's tensors
HINTS = (
    "names are matched exactly, then without torch.compile/DDP prefixes (_orig_mod., module.) and PEFT "
    "adapter segments (.default.); a frozen base that the global does not hold needs "
    "Client(..., trainable_only=True)"
)


@dataclass(frozen=True)
class Slot:
    """One global tensor and the model tensor it lives in (all of the model's names for it)."""

    name: str  # the global's name
    tensor: torch.Tensor  # the model's tensor, detached: writes into it land in the model (and every alias)
    aliases: tuple[str, ...]  # the model's names for it
    trainable: bool


@dataclass(frozen=True)
class Binding:
    """The model seen through the global's names."""

    slots: dict[str, Slot]  # global name -> slot
    missing: dict[str, tuple[int, ...]]  # global tensors the model does not have (name -> shape)
    unbound: list[str]  # the model's federated tensors that match no global tensor (model names)


def model_state(
    model: nn.Module | Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], frozenset[str]]:
    """A model's tensors by name (parameters as Parameters, so ``requires_grad`` is visible) and its PEFT
    adapter names; a compiled or data-parallel module is unwrapped first."""
    if not isinstance(model, nn.Module):
        return dict(model), DEFAULT_ADAPTERS
    module = unwrap(model)
    peft_config = getattr(module, "peft_config", None)
    adapters = (
        frozenset(peft_config) if isinstance(peft_config, Mapping) and peft_config else DEFAULT_ADAPTERS
    )
    return module.state_dict(keep_vars=True), adapters


def unwrap(module: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` or (Distributed)DataParallel wrapper holds, however deeply nested."""
    while True:
        inner = getattr(module, "_orig_mod", None)
        if not isinstance(inner, nn.Module) and isinstance(
            module, nn.DataParallel | nn.parallel.DistributedDataParallel
        ):
            inner = module.module
        if not isinstance(inner, nn.Module):
            return module
        module = inner


def bind(
    model: nn.Module | Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, ...]],
    *,
    trainable_only: bool = False,
) -> Binding:
    """Line ``model`` up with a global model of ``shapes``; raise ``ConfigError`` on anything ambiguous.

    With ``trainable_only``, tensors that do not require gradients are left out of ``slots`` and ``unbound``.
    """
    state, adapters = model_state(model)
    lookup = _GlobalNames(shapes, adapters)
    slots: dict[str, Slot] = {}
    unbound: list[str] = []
    for aliases in alias_groups(state):
        tensor = state[aliases[0]]
        trainable = any(state[a].requires_grad for a in aliases)
        if trainable_only and not trainable:
            continue
        names = sorted({g for a in aliases if (g := lookup.find(a)) is not None})
        if not names:
            unbound.extend(aliases)
            continue
        if len(names) > 1:
            raise ConfigError(
                f"the global model holds {names} as separate tensors, but in this model they are one tensor "
                f"(tied weights: {list(aliases)}); start the aggregator from a model saved with its ties "
                "(save_pretrained, safetensors.torch.save_model, or torch.save of the state dict)"
            )
        name = names[0]
        if name in slots:
            raise ConfigError(
                f"global tensor {name!r} matches both {list(slots[name].aliases)} and {list(aliases)} "
                f"of this model ({HINTS})"
            )
        if tuple(tensor.shape) != shapes[name]:
            raise ConfigError(
                f"{aliases[0]}: this model has shape {tuple(tensor.shape)}, the global {name!r} "
                f"{shapes[name]} (a different model configuration?)"
            )
        if tensor.dtype not in FEDERATED_DTYPES:
            raise ConfigError(
                f"{aliases[0]} is {tensor.dtype}; fedq federates float32, float16 and bfloat16 tensors "
                "(convert the model, e.g. model.float())"
            )
        slots[name] = Slot(name, tensor.detach(), aliases, trainable)
    missing = {n: tuple(s) for n, s in shapes.items() if n not in slots}
    return Binding(slots, missing, unbound)


def missing_hint(binding: Binding) -> str:
    """What to do about global tensors the model lacks: a PeftModel facing a plain model's global cannot be
    fixed by a name rule (the global has no adapters to train), so that case is named; else the rules."""
    peft_model = any(name.startswith(PEFT_PREFIX) for name in binding.unbound)
    if peft_model and not any(name.startswith(PEFT_PREFIX) or "lora_" in name for name in binding.missing):
        return (
            "this is a PEFT model and the global is a plain model without adapters: to federate the "
            "adapters, start the aggregator with --init the adapter directory (the PeftModel's "
            "save_pretrained); to federate the whole model, pass the base model or model.merge_and_unload()"
        )
    return HINTS


def alias_groups(state: Mapping[str, torch.Tensor]) -> list[tuple[str, ...]]:
    """The floating-point tensors of ``state``, grouped by the memory they view, in state-dict order."""
    groups: dict[object, list[str]] = {}
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            continue
        groups.setdefault(_memory_key(tensor, name), []).append(name)
    return [tuple(names) for names in groups.values()]


def _memory_key(tensor: torch.Tensor, name: str) -> object:
    """Equal for two tensors exactly when they are the same view of the same memory."""
    if tensor.numel() == 0 or tensor.device.type == "meta":
        return name  # no memory to share: each is its own tensor
    storage = tensor.untyped_storage()
    return (
        tensor.device,
        storage.data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tensor.stride(),
        tensor.dtype,
    )


class _GlobalNames:
    """The global's names, looked up exactly, then with wrapper prefixes and adapter segments ignored."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], adapters: frozenset[str]) -> None:
        self.exact = set(shapes)
        self.adapters = adapters
        normalized: dict[str, list[str]] = {}
        for name in shapes:
            normalized.setdefault(self.normalize(name), []).append(name)
        # a normalized name that two global names share is ambiguous and matches neither
        self.normalized = {key: names[0] for key, names in normalized.items() if len(names) == 1}

    def normalize(self, name: str) -> str:
        parts = name.split(".")
        while len(parts) > 1 and parts[0] in WRAPPER_SEGMENTS:
            parts = parts[1:]
        parts = [p for p in parts if p not in IGNORED_SEGMENTS and p not in self.adapters]
        if tuple(parts[-2:]) == DORA_MAGNITUDE:
            parts = parts[:-1]
        return ".".join(parts)

    def find(self, name: str) -> str | None:
        if name in self.exact:
            return name
        return self.normalized.get(self.normalize(name))

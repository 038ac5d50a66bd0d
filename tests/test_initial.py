"""fedq.aggregation.initial: what ``--init`` makes of the forms Hugging Face users save models in, and what
it refuses, with tiny GPT-2 and Llama models built from configs (end-to-end runs: test_hf_client.py)."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import safetensors.torch
import torch

from fedq.aggregation import initial
from fedq.binding import bind
from fedq.errors import ConfigError
from tests.hf_models import tiny_gpt2, tiny_llama

CPU = torch.device("cpu")
WTE, HEAD = "transformer.wte.weight", "lm_head.weight"


def test_sharded_save_pretrained_is_the_whole_model_in_float32(tmp_path: Path) -> None:
    model = tiny_llama(seed=0).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert len(json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"]) > 1
    loaded = initial.read_model(tmp_path / "hf", CPU)
    expected = model.state_dict()
    assert set(loaded) == set(expected)  # Llama's head is not tied: both are held
    for name, tensor in loaded.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, expected[name].float()), name


def test_a_tied_head_saved_twice_is_held_once_when_the_config_ties_it(tmp_path: Path) -> None:
    model = tiny_gpt2(seed=0)
    model.save_pretrained(tmp_path / "hf")
    state = {n: t.clone() for n, t in model.state_dict().items()}  # both names, separate copies
    safetensors.torch.save_file(state, str(tmp_path / "hf" / "model.safetensors"))
    assert HEAD not in initial.read_shapes(tmp_path / "hf") and WTE in initial.read_shapes(tmp_path / "hf")

    safetensors.torch.save_file(state, str(tmp_path / "copies.safetensors"))  # no config: two tensors
    shapes = initial.read_shapes(tmp_path / "copies.safetensors")
    assert {WTE, HEAD} <= set(shapes)
    with pytest.raises(ConfigError, match="tied weights"):  # a tied client says so before anything moves
        bind(tiny_gpt2(seed=1), shapes)


def test_refusals_say_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"save_pretrained"):
        initial.read_shapes(tmp_path / "empty")
    with pytest.raises(ConfigError, match="no such file"):
        initial.read_shapes(tmp_path / "missing.safetensors")
    wide = {"w": torch.zeros(4, 4, dtype=torch.float64), "b": torch.zeros(4)}
    safetensors.torch.save_file(wide, str(tmp_path / "wide.safetensors"))
    torch.save(wide, tmp_path / "wide.pt")
    for path in (tmp_path / "wide.safetensors", tmp_path / "wide.pt"):
        with pytest.raises(ConfigError, match=r"float64.*model\.float\(\)"):
            initial.read_shapes(path)
    torch.save({"model": {"w": torch.zeros(2)}}, tmp_path / "nested.pt")
    with pytest.raises(ConfigError, match="flat state dict"):
        initial.read_shapes(tmp_path / "nested.pt")
    with pytest.raises(ConfigError, match="float64"):
        bind(torch.nn.Linear(4, 4).double(), {"weight": (4, 4), "bias": (4,)})


def test_peft_modules_to_save_match_their_saved_names(tmp_path: Path) -> None:
    config = peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    peft.get_peft_model(tiny_llama(seed=0), config).save_pretrained(tmp_path / "adapter")
    shapes = initial.read_shapes(tmp_path / "adapter")
    model = peft.get_peft_model(tiny_llama(seed=1), config)
    binding = bind(model, shapes, trainable_only=True)
    assert not binding.unbound and not binding.missing and set(binding.slots) == set(shapes)
    head = binding.slots["base_model.model.lm_head.weight"]
    assert head.aliases == ("base_model.model.lm_head.modules_to_save.default.weight",)  # the trained copy

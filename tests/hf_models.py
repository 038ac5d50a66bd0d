"""Tiny Hugging Face models built from configs (nothing is downloaded) and a real aggregator for them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import peft
import tokenizers
import torch
import transformers

from fedq.aggregation.service import Settings
from fedq.topology import Names
from tests.aggregation_helpers import Worker, every_update

VOCAB = 96


def tiny_gpt2(seed: int = 0) -> torch.nn.Module:
    """GPT-2 with tied input embeddings and output head (``transformer.wte.weight`` is ``lm_head.weight``)."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config)


def tiny_llama(seed: int = 0, *, width: int = 32, layers: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(config)


def with_lora(model: torch.nn.Module, **options: object) -> torch.nn.Module:
    """A PeftModel: the base frozen, LoRA adapters on the attention projections (B starts at zero)."""
    settings: dict[str, object] = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **options}
    return peft.get_peft_model(model, peft.LoraConfig(**settings))


def char_tokenizer(text: str) -> transformers.PreTrainedTokenizerFast:
    """A character-level tokenizer of ``text``'s characters, built locally (ids 0-2: pad, unk, eos)."""
    specials = ["<pad>", "<unk>", "<eos>"]
    vocab = {token: i for i, token in enumerate(specials + sorted(set(text)))}
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex(r"[\s\S]"), "isolated")
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=model, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>"
    )


@contextmanager
def aggregator(
    url: str,
    namespace: str,
    init: Path,
    state_dir: Path,
    max_versions: int = 0,
    client_config: dict[str, int] | None = None,
) -> Iterator[Path]:
    """A real aggregator (one shard, one version per update) in a thread, started from ``init``; yields its
    state directory (read the global with ``aggregation_helpers.model_of``)."""
    settings = Settings(
        names=Names(namespace),
        strategy=every_update(),
        init=init,
        state_dir=state_dir,
        max_versions=max_versions,
        client_config=client_config or {},
    )
    worker = Worker(url, settings)
    try:
        yield state_dir
    finally:
        worker.stop.set()
        worker.join(30)


def perturb(model: torch.nn.Module, scale: float, seed: int) -> None:
    """Add N(0, scale) noise to every parameter that trains (a tied one once)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)

"""``python -m workers.hf_client``: federated LoRA fine-tuning of a Llama model with transformers and PEFT.

A ``LlamaForCausalLM`` is built from a config (nothing is downloaded; the seed gives every client the same
frozen base), PEFT LoRA adapters on every linear layer of its blocks are trained with transformers'
``Trainer`` on this client's shard of the shipped tinyshakespeare (characters as tokens), and one line,
``fedq.hf.FedqCallback``, federates the adapters: only they travel, in nf4 by default. Against a running
aggregator:

    python -m workers.hf_client --save-init hf-init      # version 0: the adapters every client starts from
    fedq aggregator --init hf-init --strategy fedbuff --buffer-size 2 --max-versions 20 --state-dir hf-state
    python -m workers.hf_client --index 0 & python -m workers.hf_client --index 1

Each client prints one line per version it receives, as the demo does: the version, the time, the loss of
that global model on held-out text, what this client has sent so far (wire and fp32-equivalent MB, ratio) and
its peak RSS. It stops when the aggregator announces its final version (``--max-versions``), or on Ctrl-C.
Every option may also come from ``FEDQ_<OPTION>`` (``FEDQ_NAMESPACE``, ``FEDQ_CODEC``), as for ``fedq``
commands.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import peft
import torch
import transformers
from torch.nn import functional as F

from fedq import metrics
from fedq.cli import configure_logging
from fedq.cli.config import defaults_from
from fedq.cli.options import add_amqp_url, add_namespace
from fedq.client import Round
from fedq.errors import FedqError
from fedq.hf import FedqCallback
from workers import shakespeare

log = logging.getLogger("fedq.hf_client")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--save-init", type=Path, metavar="DIR", help="write the initial adapters (a PEFT directory) and exit")
    a("--name", default="hf-client", help="label of this client in stream ids and aggregator logs")
    a("--index", type=int, default=0, help="which shard of the text this client trains on (0 .. clients-1)")
    a("--clients", type=int, default=2, help="number of clients the text is split between")
    a("--split", choices=("iid", "speaker", "play"), default="play", help="how the text is split")
    add_amqp_url(parser)
    add_namespace(parser)
    a("--codec", default="nf4", help="update codec: fp32, fp16, bf16, int8, nf4, fp4")
    a("--seed", type=int, default=0, help="seed of the base model, the adapters, the split and the batches")
    a("--width", type=int, default=128, help="hidden size of the Llama model")
    a("--layers", type=int, default=2, help="transformer blocks")
    a("--heads", type=int, default=4, help="attention heads (key/value heads: half of them)")
    a("--rank", type=int, default=8, help="LoRA rank")
    a("--block-size", type=int, default=64, help="context length in characters")
    a("--batch-size", type=int, default=16, help="sequences per step")
    a("--local-steps", type=int, default=10, help="steps per update unless the server sends local_steps")
    a("--lr", type=float, default=3e-3, help="learning rate of the Trainer's AdamW")
    a("--max-steps", type=int, default=100_000, help="stop training after this many steps in any case")
    a("--eval-batches", type=int, default=4, help="held-out batches scoring each received version")
    a("--threads", type=int, default=1, help="torch CPU threads")


def build_model(args: argparse.Namespace, vocab_size: int) -> peft.PeftModel:
    """The frozen Llama base (the same for every client of a seed) with LoRA adapters."""
    torch.manual_seed(args.seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.width,
        intermediate_size=4 * args.width,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=max(1, args.heads // 2),
        max_position_embeddings=args.block_size,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    base = transformers.LlamaForCausalLM(config)
    lora = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=TARGETS)
    return peft.get_peft_model(base, lora)


class Windows(torch.utils.data.Dataset):
    """Random windows of this client's text (reproducible per index), as causal-LM examples."""

    def __init__(self, tokens: torch.Tensor, block_size: int, length: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.starts = torch.randint(len(tokens) - block_size, (length,), generator=g)
        self.tokens = tokens
        self.block_size = block_size

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        window = self.tokens[int(self.starts[i]) : int(self.starts[i]) + self.block_size]
        return {"input_ids": window, "labels": window}  # the model shifts the labels itself


class LiveLine(FedqCallback):
    """FedqCallback that scores each received version and prints its line."""

    def __init__(self, held_out: list[shakespeare.Batch], **options: Any) -> None:
        super().__init__(**options)
        self.held_out = held_out
        self.start = time.monotonic()
        columns = ("version", "time", "val loss", "wire MB", "fp32 MB", "ratio", "RSS")
        print(" ".join(f"{c:>{w}}" for c, w in zip(columns, (7, 6, 8, 8, 8, 6, 7), strict=True)))

    def on_round(self, round: Round, model: torch.nn.Module) -> None:
        assert self.client is not None
        loss = evaluate(model, self.held_out)
        wire, fp32 = self.client.wire_bytes, self.client.fp32_bytes
        ratio, rss = fp32 / wire if wire else 0.0, metrics.peak_rss_bytes() / 2**20
        print(
            f"{round.version:>7} {time.monotonic() - self.start:>5.0f}s {loss:>8.3f} {wire / 1e6:>8.2f} "
            f"{fp32 / 1e6:>8.2f} {ratio:>5.1f}x {rss:>5.0f}MB" + ("  (final)" if round.final else ""),
            flush=True,
        )


def evaluate(model: torch.nn.Module, batches: list[shakespeare.Batch]) -> float:
    """Mean next-character cross-entropy on held-out batches."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        losses = [
            float(F.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten())) for x, y in batches
        ]
    model.train(was_training)
    return sum(losses) / len(losses)


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    corpus = shakespeare.build_corpus(args.clients, args.split, args.seed)
    model = build_model(args, corpus.vocab.size)
    if args.save_init:
        model.save_pretrained(args.save_init)
        print(
            f"initial adapters written to {args.save_init}: start the aggregator with --init {args.save_init}"
        )
        return 0
    held_out = shakespeare.validation_batches(corpus, args.eval_batches, 32, args.block_size, args.seed)
    data = Windows(
        corpus.clients[args.index], args.block_size, args.max_steps * args.batch_size, args.seed + args.index
    )
    callback = LiveLine(
        held_out,
        label=args.name,
        amqp_url=args.amqp_url,
        namespace=args.namespace,
        codec=args.codec,
        local_steps=args.local_steps,
    )
    with tempfile.TemporaryDirectory(prefix="fedq-hf-") as scratch:
        training = transformers.TrainingArguments(
            output_dir=scratch,
            max_steps=args.max_steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            logging_steps=args.local_steps,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            seed=args.seed + args.index,
        )
        trainer = transformers.Trainer(model=model, args=training, train_dataset=data, callbacks=[callback])
        trainer.remove_callback(transformers.PrinterCallback)  # the live line is the output
        try:
            trainer.train()
        except KeyboardInterrupt:
            log.info("%s: stopped", args.name)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m workers.hf_client",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    # the same FEDQ_<OPTION> environment as the aggregator it joins: one FEDQ_NAMESPACE for both
    parser.set_defaults(**defaults_from(parser, {}, os.environ))
    args = parser.parse_args(argv)
    configure_logging(verbose=False)
    try:
        return run(args)
    except FedqError as exc:  # as `fedq` commands end: one line and the error's exit code, no traceback
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())

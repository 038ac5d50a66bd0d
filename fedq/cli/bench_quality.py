"""Validation loss vs wire bytes for each codec setting: a small GPT in one process (fedq/bench/quality.py),
or a transformers Llama federated through the broker, both directions compressed
(fedq/bench/quality_llama.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedq.cli.options import add_amqp_url

# The options whose default depends on --model: the GPT table of docs/benchmarks.md, and a Llama run long
# enough for federated fp32 to come within 10% of centralized training.
MODEL_DEFAULTS: dict[str, dict[str, float]] = {
    "gpt": {
        "rounds": 8,
        "local_steps": 8,
        "batch_size": 32,
        "lr": 3e-3,
        "n_embd": 160,
        "n_layer": 4,
        "block_size": 64,
        "eval_batches": 8,
    },
    "llama": {
        "rounds": 30,
        "local_steps": 2,
        "batch_size": 16,
        "lr": 3e-3,
        "n_embd": 256,
        "n_layer": 6,
        "block_size": 32,
        "eval_batches": 4,
    },
}


def _per_model(option: str) -> str:
    return ", ".join(f"{model}: {defaults[option]:g}" for model, defaults in MODEL_DEFAULTS.items())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a(
        "--model",
        choices=tuple(MODEL_DEFAULTS),
        default="gpt",
        help="gpt: the demo's 1.3 M-parameter GPT, updates only, in one process; llama: a 4.5 M-parameter "
        "LlamaForCausalLM through the broker (fedq aggregator + fedq.Client), both directions compressed",
    )
    a("--clients", type=int, default=4, help="number of clients")
    a(
        "--rounds",
        type=int,
        default=None,
        help=f"FedAvg rounds, every client sends once a round ({_per_model('rounds')})",
    )
    a(
        "--local-steps",
        type=int,
        default=None,
        help=f"optimizer steps per client update ({_per_model('local_steps')})",
    )
    a(
        "--batch-size",
        type=int,
        default=None,
        help=f"sequences per optimizer step ({_per_model('batch_size')})",
    )
    a("--lr", type=float, default=None, help=f"client AdamW learning rate ({_per_model('lr')})")
    a("--server-lr", type=float, default=1.0, help="llama: the aggregator's FedAvg server learning rate")
    a("--split", default="play", help="data split: iid, speaker or play")
    a("--seed", type=int, default=0, help="seed of data split, model init and batches")
    a("--n-embd", type=int, default=None, help=f"model width ({_per_model('n_embd')})")
    a("--n-layer", type=int, default=None, help=f"transformer blocks ({_per_model('n_layer')})")
    a(
        "--block-size",
        type=int,
        default=None,
        help=f"context length in characters ({_per_model('block_size')})",
    )
    a(
        "--eval-batches",
        type=int,
        default=None,
        help=f"validation batches of 64 sequences ({_per_model('eval_batches')})",
    )
    a(
        "--settings",
        default=None,
        help="comma-separated rows to run (default: every codec setting of the model and central)",
    )
    a(
        "--threads",
        type=int,
        default=2,
        help="torch CPU threads (of this process and, llama, the aggregator's)",
    )
    add_amqp_url(parser)
    a("--json", type=Path, default=None, help="write the results here")
    a("--plot", type=Path, default=None, help="write a PNG plot (val loss vs wire bytes) here")


def run(args: argparse.Namespace) -> int:
    for option, value in MODEL_DEFAULTS[args.model].items():
        if getattr(args, option) is None:
            setattr(args, option, value)
    if args.model == "llama":
        from fedq.bench import quality_llama

        return quality_llama.run(args)
    from fedq.bench import quality

    return quality.run(args)

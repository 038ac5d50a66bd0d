"""Run the demo client (workers/demo_client.py): a small GPT trained on its shard of tinyshakespeare.

It receives each global model version, trains ``local_steps`` steps and sends its delta, until
``--until-version`` or until stopped (SIGTERM and SIGINT end it between two calls).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedq.cli.options import add_amqp_url, add_namespace

# workers.shakespeare.SPLITS, spelled out so that building this parser does not import torch (a test checks).
SPLITS = ("iid", "speaker", "play")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Model and data options that every process of a run must agree on (the launcher passes them through)."""
    a = parser.add_argument
    a("--clients", type=int, default=4, help="number of clients the text is split between")
    a("--split", choices=SPLITS, default="play", help="how the text is split between clients")
    a("--seed", type=int, default=0, help="seed of the split, the initial model and the batches")
    a("--n-embd", type=int, default=160, help="model width")
    a("--n-layer", type=int, default=4, help="transformer blocks")
    a("--n-head", type=int, default=4, help="attention heads")
    a("--block-size", type=int, default=64, help="context length in characters")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--name", default="client0", help="client name (the broker user when per-client users are set up)")
    a("--index", type=int, default=0, help="which shard of the text this client trains on (0 .. clients-1)")
    add_amqp_url(parser)
    add_namespace(parser)
    a("--codec", default="nf4", help="update codec: fp32, fp16, bf16, int8, nf4, fp4")
    a(
        "--error-feedback",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="carry quantization error into the next update (default: on below 16 bits)",
    )
    a("--local-steps", type=int, default=10, help="steps per update unless the server sends local_steps")
    a("--batch-size", type=int, default=32, help="sequences per step")
    a("--lr", type=float, default=3e-3, help="AdamW learning rate")
    a(
        "--until-version",
        type=int,
        default=0,
        help="stop after receiving this version (0 = run until stopped)",
    )
    a(
        "--eval-batches",
        type=int,
        default=1,
        help="held-out batches on which each received global model is scored (0 = none)",
    )
    a("--threads", type=int, default=1, help="torch CPU threads")
    a("--metrics-port", type=int, default=0, help="serve Prometheus metrics on this port (0 = off)")
    a(
        "--metrics-file",
        type=Path,
        default=None,
        help="write the final metrics page (Prometheus text) here on exit: fedq demo reads the last counts",
    )
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from workers import demo_client

    return demo_client.run(args)

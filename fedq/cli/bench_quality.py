"""Validation loss vs wire bytes for each codec setting, in one process (fedq/bench/quality.py)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clients", type=int, default=4, help="number of clients")
    parser.add_argument(
        "--rounds", type=int, default=8, help="FedAvg rounds (every client sends once a round)"
    )
    parser.add_argument("--local-steps", type=int, default=8, help="optimizer steps per client update")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per optimizer step")
    parser.add_argument("--lr", type=float, default=3e-3, help="client AdamW learning rate")
    parser.add_argument("--split", default="play", help="data split: iid, speaker or play")
    parser.add_argument("--seed", type=int, default=0, help="seed of data split, model init and batches")
    parser.add_argument("--n-embd", type=int, default=160, help="model width")
    parser.add_argument("--n-layer", type=int, default=4, help="transformer blocks")
    parser.add_argument("--block-size", type=int, default=64, help="context length in characters")
    parser.add_argument("--eval-batches", type=int, default=8, help="validation batches (of 64 sequences)")
    parser.add_argument(
        "--settings",
        default=None,
        help="comma-separated rows to run (default: every codec setting and central)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument(
        "--plot", type=Path, default=None, help="write a PNG plot (val loss vs wire bytes) here"
    )


def run(args: argparse.Namespace) -> int:
    from fedq.bench import quality

    return quality.run(args)

"""Run the main demo (workers/demo.py): one aggregator and four clients learn Shakespeare over the local
broker, one line per model version, a results JSON and a plot at the end."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedq.cli.client import add_model_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--versions", type=int, default=24, help="run until this model version")
    a("--buffer-size", type=int, default=4, help="FedBuff: updates per version")
    a(
        "--local-steps",
        type=int,
        default=10,
        help="client steps per update (sent to clients with each version)",
    )
    a("--codec", default="nf4", help="client update codec")
    a("--batch-size", type=int, default=32, help="client sequences per step")
    a("--eval-batches", type=int, default=4, help="validation batches (of 64 sequences) per version")
    a("--results-dir", type=Path, default=Path("results"), help="where the results JSON and plot go")
    a("--timeout", type=float, default=600.0, help="give up when no new version comes for this long (s)")
    a("--quick", action="store_true", help="a tiny model, 2 clients and 3 versions (the test suite's run)")
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from workers import demo

    return demo.run(args)

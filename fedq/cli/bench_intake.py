"""The aggregator's own CPU per update, without a broker or clients beside it (fedq/bench/intake.py)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--updates", type=int, default=400, help="demo-model updates to fold")
    parser.add_argument("--buffer-size", type=int, default=10, help="FedBuff K: updates per version")
    parser.add_argument("--codec", default="nf4", help="codec policy of the updates")
    parser.add_argument(
        "--phases", action="store_true", help="also the CPU of intake, fold and stepping a version"
    )


def run(args: argparse.Namespace) -> int:
    from fedq.bench import intake

    return intake.run(args)

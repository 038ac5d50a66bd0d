"""The client's encode and the aggregator's fold on the device found at run time (fedq/bench/device.py)."""

from __future__ import annotations

import argparse

from fedq.cli.bench_codecs import SHAPES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", choices=SHAPES, default="gpt2", help="model whose tensor shapes to use")
    parser.add_argument("--codec", default="nf4", help="codec of the updates")
    parser.add_argument("--updates", type=int, default=4, help="staged updates folded into the model at once")
    parser.add_argument(
        "--device", default="auto", help="torch device; auto: cuda when torch sees one, else cpu"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")


def run(args: argparse.Namespace) -> int:
    from fedq.bench import device

    return device.run(args)

"""Wire size, error and speed of every codec on a real model's shapes (fedq/bench/codecs.py)."""

from __future__ import annotations

import argparse

# fedq.bench.codecs.SHAPES, spelled out so that building this parser does not import torch (a test checks).
SHAPES = ("gpt2", "llama-3.2-1b")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", choices=SHAPES, default="gpt2", help="model whose tensor shapes to use")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as a JSON list to PATH")
    parser.add_argument(
        "--device",
        default="auto",
        help="torch device for encode and decode; auto: cuda when available, else cpu",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads for both implementations (0: torch's default; 1 is faster on a machine whose "
        "cores are busy)",
    )


def run(args: argparse.Namespace) -> int:
    from fedq.bench import codecs

    return codecs.run(args)

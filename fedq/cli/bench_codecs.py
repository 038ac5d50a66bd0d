"""Wire size, error and speed of every codec on a real model's shapes (fedq/bench/codecs.py)."""

from __future__ import annotations

import argparse

# fedq.bench.codecs' SHAPES, FEDQ_CODECS and VALUES, spelled out so that building this parser does not import
# torch (a test checks).
SHAPES = (
    "gpt2",
    "llama-3.2-1b",
    *(f"lora-r{rank}-w{width}" for rank in (8, 16) for width in (2048, 4096, 8192)),
    "lora-r4-w32",
)
CODECS = ("fp32", "fp16", "bf16", "int8", "nf4", "fp4")
VALUES = ("deltas", "weights")


def _codecs(text: str) -> list[str]:
    names = text.split(",")
    unknown = sorted(set(names) - set(CODECS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown codecs {unknown}; known: {', '.join(CODECS)}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", choices=SHAPES, default="gpt2", help="model whose tensor shapes to use")
    parser.add_argument(
        "--codecs",
        type=_codecs,
        help=f"comma-separated codecs to measure (default: all of {','.join(CODECS)})",
    )
    parser.add_argument("--values", choices=VALUES, help="only this kind of values (default: both)")
    parser.add_argument(
        "--load",
        type=int,
        default=0,
        metavar="N",
        help="also measure with N busy processes per core started by the bench, and report both",
    )
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
        help="torch CPU threads for both implementations (0: torch's default, as a user's process has it)",
    )


def run(args: argparse.Namespace) -> int:
    from fedq.bench import codecs

    return codecs.run(args)

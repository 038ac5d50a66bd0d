"""Peak memory and throughput of regular, container and file streaming through the broker, against raw pika
(fedq/bench/stream.py)."""

from __future__ import annotations

import argparse

from fedq.cli.bench_codecs import CODECS
from fedq.cli.options import add_amqp_url, add_chunk_bytes, size

# fedq.bench.stream.SHAPES and MODES, spelled out so that building this parser does not import torch.
SHAPES = ("gpt2", "llama-3.1-8b", "llama-3.2-1b", "tiny")
MODES = ("regular", "container", "file")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", choices=SHAPES, default="llama-3.2-1b", help="model shapes to stream")
    parser.add_argument(
        "--codec", action="append", choices=CODECS, help="codec(s) to run (repeatable; default: fp32 and nf4)"
    )
    parser.add_argument(
        "--mode", action="append", choices=MODES, help="mode(s) to run (repeatable; default: all)"
    )
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default="float32", help="dtype of the model"
    )
    add_chunk_bytes(parser)
    parser.add_argument(
        "--memory-budget",
        type=size,
        default="512MiB",
        help="each process's budget: sets the publish window and prefetch, and caps file-mode RSS",
    )
    parser.add_argument("--dir", default=None, help="where file mode writes its files (default: a temp dir)")
    add_amqp_url(parser)
    parser.add_argument("--json", default=None, help="write the rows as JSON to this path")


def run(args: argparse.Namespace) -> int:
    from fedq.bench import stream

    return stream.run(args)

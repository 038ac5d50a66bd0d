"""One whole federated round, each party in its own process (fedq/bench/round.py)."""

from __future__ import annotations

import argparse

from fedq.cli.aggregator import MODEL_CODECS
from fedq.cli.bench_codecs import CODECS
from fedq.cli.bench_stream import SHAPES
from fedq.cli.options import add_amqp_url, positive


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", choices=SHAPES, default="llama-3.2-1b", help="model shapes")
    parser.add_argument(
        "--clients", type=positive, default=2, help="client processes (FedAvg over all of them)"
    )
    parser.add_argument("--codec", choices=CODECS, default="nf4", help="the clients' update codec")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="the clients' model dtype")
    parser.add_argument(
        "--model-codec",
        choices=MODEL_CODECS,
        default="fp32",
        help="the aggregator's --model-codec (versions)",
    )
    parser.add_argument("--threads", type=int, default=2, help="the aggregator's torch threads")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the round")
    add_amqp_url(parser)
    parser.add_argument(
        "--dir",
        default=None,
        help="work directory, kept (default: a temp dir, removed; a failed run's log stays)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the row as JSON to PATH")


def run(args: argparse.Namespace) -> int:
    from fedq.bench import round as round_bench

    return round_bench.run(args)

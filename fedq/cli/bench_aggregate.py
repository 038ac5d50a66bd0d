"""Aggregator memory and fold speed vs the number of client updates (fedq/bench/aggregate.py)."""

from __future__ import annotations

import argparse

from fedq.cli.bench_codecs import CODECS
from fedq.cli.bench_stream import SHAPES
from fedq.cli.options import add_amqp_url, add_chunk_bytes, counts

# the names of fedq.bench.aggregate.STRATEGIES (that module imports torch: not at --help time)
STRATEGIES = (
    "fedbuff",
    "fedavg",
    "fedasync",
    "median",
    "trimmed-mean",
    "krum",
    "multi-krum",
    "centered-clipping",
    "fedavgm",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "dp",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", choices=SHAPES, default="llama-3.2-1b", help="model shapes")
    parser.add_argument(
        "--clients", type=counts, default="1,8,32", help="comma-separated client counts to measure"
    )
    parser.add_argument("--codec", choices=CODECS, default="nf4", help="codec of the client updates")
    parser.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="fedbuff",
        help="how the aggregator folds the updates (robust rules, server optimizers and dp over fedbuff; "
        "docs/aggregation.md)",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="fold device")
    add_chunk_bytes(parser)
    add_amqp_url(parser)
    parser.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    parser.add_argument("--json", default=None, help="write the rows as JSON to this path")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads of the clients, the fold-throughput loop and the aggregator (--threads)",
    )


def run(args: argparse.Namespace) -> int:
    from fedq.bench import aggregate

    return aggregate.run(args)

"""The aggregator's loop against 10 to hundreds of clients (fedq/bench/scale.py)."""

from __future__ import annotations

import argparse

from fedq.cli.bench_codecs import CODECS
from fedq.cli.options import add_amqp_url, counts, positive, size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--clients", type=counts, default="10,100,500", help="comma-separated client counts to measure"
    )
    parser.add_argument("--processes", type=positive, default=3, help="processes the clients are spread over")
    parser.add_argument("--codec", choices=CODECS, default="nf4", help="codec of the clients' updates")
    parser.add_argument("--buffer-size", type=int, default=10, help="FedBuff K: updates per version")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured window per client count")
    parser.add_argument("--warmup", type=float, default=8.0, help="seconds of sending before the window")
    parser.add_argument(
        "--memory-budget",
        help="the aggregator's --memory-budget (default: its own), which sets its prefetch; with an update's "
        "many small messages a larger one keeps more of them coming",
    )
    parser.add_argument(
        "--queue-bytes",
        type=size,
        default=0,
        help="bound the update queue's backlog to this many bytes with a broker policy (default 0: the queue "
        "as declared, 512 MiB); the raw broker rate is measured on a queue as declared either way",
    )
    add_amqp_url(parser)
    parser.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH")


def run(args: argparse.Namespace) -> int:
    from fedq.bench import scale

    return scale.run(args)

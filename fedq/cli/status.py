"""The state of a federation on one screen: queues, model versions, clients, dead letters (fedq/status.py)."""

from __future__ import annotations

import argparse
import os

from fedq.cli.options import add_amqp_url, add_namespace


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_amqp_url(parser)
    parser.add_argument(
        "--management-url",
        default=os.environ.get("FEDQ_MANAGEMENT_URL"),
        help="management API URL with credentials (env FEDQ_MANAGEMENT_URL; default: the AMQP URL's host "
        "and credentials on port 15672)",
    )
    add_namespace(parser)
    parser.add_argument(
        "--metrics-url",
        action="append",
        default=[],
        metavar="URL",
        help="a worker's metrics endpoint, e.g. localhost:9101 (repeat for each worker)",
    )
    parser.add_argument("--peek", type=int, default=200, help="dead letters inspected for their reasons")
    parser.add_argument("--top", type=int, default=5, help="most common dead-letter reasons shown")
    parser.add_argument(
        "--top-contributors", type=int, default=20, help="contributors of the newest version shown"
    )


def run(args: argparse.Namespace) -> int:
    from fedq import status

    return status.run(args)

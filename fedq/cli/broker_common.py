"""What the ``fedq broker`` commands share: the broker's URLs, the namespace, the topology options."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any

from fedq.cli.options import add_amqp_url, add_namespace

if TYPE_CHECKING:
    from fedq.broker import Management


def add_broker_arguments(parser: argparse.ArgumentParser) -> None:
    add_amqp_url(parser)
    parser.add_argument(
        "--management-url",
        default=os.environ.get("FEDQ_MANAGEMENT_URL"),
        help="management API URL with credentials (env FEDQ_MANAGEMENT_URL; default: the AMQP URL's host "
        "and user, port 15672)",
    )
    add_namespace(parser)


def add_topology_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", type=int, default=1, help="number of aggregator shards (update queues)")
    parser.add_argument("--quorum", action="store_true", help="quorum queues for updates/control (clusters)")


def management(args: argparse.Namespace) -> Management:
    from fedq.broker import Management, management_url_for

    return Management(args.management_url or management_url_for(args.amqp_url))


def topology_definitions(args: argparse.Namespace) -> dict[str, Any]:
    from fedq.broker import vhost_of
    from fedq.topology import Names, definitions

    return definitions(Names(args.namespace), args.shards, quorum=args.quorum, vhost=vhost_of(args.amqp_url))

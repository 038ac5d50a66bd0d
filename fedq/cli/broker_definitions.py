"""Print the broker definitions (RabbitMQ's definitions.json format) of fedq's topology for one namespace."""

from __future__ import annotations

import argparse
import json

from fedq.cli.broker_common import add_topology_arguments, topology_definitions
from fedq.cli.options import add_amqp_url, add_namespace


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_amqp_url(parser)  # only its vhost is used
    add_namespace(parser)
    add_topology_arguments(parser)


def run(args: argparse.Namespace) -> int:
    print(json.dumps(topology_definitions(args), indent=2))
    return 0

"""Apply fedq's topology (exchanges, queues, bindings of one namespace) to a running broker through its
management API; existing objects with the same arguments are kept."""

from __future__ import annotations

import argparse

from fedq.cli.broker_common import (
    add_broker_arguments,
    add_topology_arguments,
    management,
    topology_definitions,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_broker_arguments(parser)
    add_topology_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from fedq.broker import apply

    apply(management(args), topology_definitions(args))
    print(f"applied the {args.namespace} topology ({args.shards} shards)")
    return 0

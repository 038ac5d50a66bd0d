"""Revoke a client: delete its broker user and close its open connections. Only client users that fedq
created are removed: an administrator, guest or an aggregator's user is refused."""

from __future__ import annotations

import argparse

from fedq.cli.broker_common import add_broker_arguments, management


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="the client's broker user name")
    add_broker_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from fedq.broker import remove_client

    closed = remove_client(management(args), args.name)
    print(f"removed {args.name} ({closed} open connection{'' if closed == 1 else 's'} closed)")
    return 0

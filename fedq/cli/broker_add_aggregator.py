"""Create a broker user for aggregator workers, with least privilege for one shard (--shard) or all: it may
declare the namespace's topology, read only its shard's update and control queues, and publish models,
versions, control messages and dead letters, but never updates. An existing user is never changed, except a
fedq aggregator's password with --rotate."""

from __future__ import annotations

import argparse

from fedq.cli.broker_common import add_user_arguments, hand_over_url, management, new_password


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_user_arguments(parser, "aggregator")
    parser.add_argument("--shard", type=int, default=None, help="the one shard it may serve (default: any)")


def run(args: argparse.Namespace) -> int:
    from fedq.broker import add_aggregator, vhost_of

    password = new_password(args)
    add_aggregator(
        management(args),
        args.name,
        password,
        namespace=args.namespace,
        shard=args.shard,
        vhost=vhost_of(args.amqp_url),
        rotate=args.rotate,
    )
    hand_over_url(args, password)
    return 0

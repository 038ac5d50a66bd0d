"""Create a least-privilege broker user for a client and print its AMQP URL: it may publish updates and read
the model streams of one namespace, nothing else, with per-user connection and channel limits. An existing
user is never changed, except a fedq client's password with --rotate."""

from __future__ import annotations

import argparse

from fedq.cli.broker_common import add_user_arguments, hand_over_url, management, new_password


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fedq.broker import DEFAULT_CLIENT_LIMITS

    add_user_arguments(parser, "client (updates are attributed to it)")
    parser.add_argument(
        "--max-connections",
        type=int,
        default=DEFAULT_CLIENT_LIMITS["max-connections"],
        help="connections the user may hold open at once (0 = no limit)",
    )
    parser.add_argument(
        "--max-channels",
        type=int,
        default=DEFAULT_CLIENT_LIMITS["max-channels"],
        help="channels over all its connections (0 = no limit)",
    )


def run(args: argparse.Namespace) -> int:
    from fedq.broker import add_client, vhost_of

    password = new_password(args)
    limits = {"max-connections": args.max_connections, "max-channels": args.max_channels}
    add_client(
        management(args),
        args.name,
        password,
        namespace=args.namespace,
        vhost=vhost_of(args.amqp_url),
        rotate=args.rotate,
        limits=limits,
    )
    hand_over_url(args, password)
    return 0

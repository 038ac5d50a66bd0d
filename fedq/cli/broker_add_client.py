"""Create a least-privilege broker user for a client and print its AMQP URL: it may publish updates and read
the model streams of one namespace, nothing else."""

from __future__ import annotations

import argparse

from fedq.cli.broker_common import add_broker_arguments, management


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="the client's broker user name (updates are attributed to it)")
    parser.add_argument("--password", default=None, help="password to set (default: a random one, printed)")
    add_broker_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import secrets
    from urllib.parse import urlsplit, urlunsplit

    from fedq.broker import add_client, q, vhost_of

    password = args.password or secrets.token_urlsafe(24)
    vhost = vhost_of(args.amqp_url)
    add_client(management(args), args.name, password, namespace=args.namespace, vhost=vhost)
    parts = urlsplit(args.amqp_url)
    netloc = f"{q(args.name)}:{q(password)}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    print(urlunsplit((parts.scheme, netloc, "/" + q(vhost), "", "")))
    return 0

"""What the ``fedq broker`` commands share: the broker's URLs, the namespace, the topology options."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedq.cli.aggregator import MODEL_CODECS
from fedq.cli.options import add_amqp_url, add_namespace, size
from fedq.topology import DEFAULT_SNAPSHOT_EVERY

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
    parser.add_argument(
        "--model-size",
        type=size,
        default=0,
        help="the model's fp32 size, e.g. 5.6GiB: the models stream keeps two versions of it, as the "
        "aggregator declares it (default: the 4 GiB floor)",
    )
    parser.add_argument(
        "--model-codec",
        choices=MODEL_CODECS,
        default="fp32",
        help="the aggregator's --model-codec: with int8 or nf4 the models stream also keeps the deltas "
        "between snapshots",
    )
    parser.add_argument(
        "--snapshot-every", type=int, default=DEFAULT_SNAPSHOT_EVERY, help="the aggregator's --snapshot-every"
    )


def add_user_arguments(parser: argparse.ArgumentParser, who: str) -> None:
    """What creating a fedq broker user takes: its name, password, rotation and where its URL goes."""
    parser.add_argument("name", help=f"the {who}'s broker user name")
    parser.add_argument(
        "--password",
        default=None,
        help="password to set (default: a random one; prefer FEDQ_PASSWORD_FILE to a command line)",
    )
    parser.add_argument(
        "--rotate", action="store_true", help="set a new password on an existing user that fedq created"
    )
    parser.add_argument(
        "--url-file",
        type=Path,
        default=None,
        help="write the user's AMQP URL to this file (mode 0600) instead of printing it",
    )
    add_broker_arguments(parser)


def new_password(args: argparse.Namespace) -> str:
    import secrets

    return args.password or secrets.token_urlsafe(24)


def hand_over_url(args: argparse.Namespace, password: str) -> None:
    """The new user's AMQP URL (the broker's host and vhost, the user's credentials): printed, or written to
    ``--url-file`` readable by its owner only, so that it need not pass through a terminal or a log."""
    from urllib.parse import urlsplit, urlunsplit

    from fedq.broker import q, vhost_of

    parts = urlsplit(args.amqp_url)
    # on stderr, so that a URL piped into a file stays alone: which federation the user was made for is the
    # one thing an operator cannot see in the URL (a user of the default namespace is refused everywhere else)
    print(
        f"user {args.name} for namespace {args.namespace!r} on vhost {vhost_of(args.amqp_url)!r}",
        file=sys.stderr,
    )
    netloc = f"{q(args.name)}:{q(password)}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    url = urlunsplit((parts.scheme, netloc, "/" + q(vhost_of(args.amqp_url)), parts.query, ""))
    if args.url_file is None:
        print(url)
        return
    fd = os.open(args.url_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(url + "\n")
    print(f"wrote {args.name}'s URL to {args.url_file}")


def management(args: argparse.Namespace) -> Management:
    from fedq.broker import Management, management_url_for

    return Management(args.management_url or management_url_for(args.amqp_url))


def topology_definitions(args: argparse.Namespace) -> dict[str, Any]:
    from fedq.broker import vhost_of
    from fedq.reconstruction import retention_bytes
    from fedq.topology import Names, definitions

    return definitions(
        Names(args.namespace),
        args.shards,
        quorum=args.quorum,
        models_retention_bytes=retention_bytes(args.model_size, args.model_codec, args.snapshot_every),
        vhost=vhost_of(args.amqp_url),
    )

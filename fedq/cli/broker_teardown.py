"""Delete a namespace from the broker: its queues (and the messages in them), its exchanges, and the broker
users fedq created for it. Refuses while workers still consume its queues, unless --force."""

from __future__ import annotations

import argparse

from fedq.cli.broker_common import add_broker_arguments, management


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("teardown_namespace", metavar="NAMESPACE", help="the namespace to delete")
    parser.add_argument("--force", action="store_true", help="delete even while workers consume its queues")
    add_broker_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from fedq.broker import teardown, vhost_of

    done = teardown(management(args), args.teardown_namespace, vhost_of(args.amqp_url), force=args.force)
    print(
        f"deleted {args.teardown_namespace}: {len(done.queues)} queues, {len(done.exchanges)} exchanges, "
        f"{len(done.users)} users" + (f" ({', '.join(done.users)})" if done.users else "")
    )
    return 0

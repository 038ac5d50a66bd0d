"""The ``fedq`` command: argument parsing only; each subcommand lives in the module that does the work.

A command module provides ``add_arguments(parser)`` and ``run(args) -> int`` (the exit status).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable

# (command words, module, one-line help)
COMMANDS: list[tuple[tuple[str, ...], str, str]] = [
    (("aggregator",), "workers.aggregator", "run an aggregator worker (one shard of the federation)"),
    (("client",), "workers.demo_client", "run the demo client: a small GPT trained on tinyshakespeare"),
    (("demo",), "workers.demo", "run the main demo: an aggregator and four clients on the local broker"),
    (("send",), "fedq.transfer", "stream a safetensors file through the broker, tensor by tensor"),
    (("receive",), "fedq.transfer", "receive a streamed model into a safetensors file"),
    (("status",), "fedq.status", "the state of a federation: queues, versions, clients, dead letters"),
    (("broker", "apply"), "fedq.broker", "apply fedq's topology (definitions.json) to a running broker"),
    (("broker", "definitions"), "fedq.broker", "print the broker definitions fedq declares"),
    (("broker", "add-client"), "fedq.broker", "create a least-privilege broker user for a client"),
    (("broker", "remove-client"), "fedq.broker", "revoke a client's broker user"),
    (("bench", "codecs"), "fedq.bench.codecs", "codec sizes, errors and speeds on real model shapes"),
    (("bench", "stream"), "fedq.bench.stream", "memory and throughput of regular/container/file streaming"),
    (("bench", "aggregate"), "fedq.bench.aggregate", "aggregator memory and fold speed vs number of clients"),
    (("bench", "quality"), "fedq.bench.quality", "validation loss vs wire bytes for each codec setting"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedq",
        description="Federated learning of large models over RabbitMQ: quantized, streamed, asynchronous.",
        epilog="Every option shows its default. The broker URL comes from --amqp-url or FEDQ_AMQP_URL.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages (default: info)")
    top = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for words, module_name, help_text in COMMANDS:
        parent = top
        if len(words) == 2:
            if words[0] not in groups:
                group = top.add_parser(words[0], help=f"{words[0]} commands")
                groups[words[0]] = group.add_subparsers(
                    dest="subcommand", metavar="SUBCOMMAND", required=True
                )
            parent = groups[words[0]]
        sub = parent.add_parser(
            words[-1],
            help=help_text,
            description=help_text,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:  # a command whose module cannot be imported stays listed but unusable
            sub.set_defaults(_missing=f"{module_name}: {exc}")
            continue
        adder = getattr(module, f"add_{words[-1].replace('-', '_')}_arguments", None) or module.add_arguments
        adder(sub)
        runner = getattr(module, f"run_{words[-1].replace('-', '_')}", None) or module.run
        sub.set_defaults(_run=runner)
    return parser


def configure_logging(verbose: bool) -> None:
    """Operator-readable logs on stderr; pika's own chatter only with --verbose."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("pika").setLevel(logging.DEBUG if verbose else logging.WARNING)


def standalone(
    prog: str,
    description: str | None,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int],
    argv: list[str] | None = None,
) -> int:
    """Run one command module as its own program (``python -m workers.aggregator``), as ``fedq`` would."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    add_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    return run(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    if hasattr(args, "_missing"):
        print(f"fedq: this command is not available: {args._missing}", file=sys.stderr)
        return 2
    return int(args._run(args))


if __name__ == "__main__":
    sys.exit(main())

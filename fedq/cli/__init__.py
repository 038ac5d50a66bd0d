"""The ``fedq`` command: one module per command, one error boundary.

How to add a command (e.g. ``fedq bench round``):
  1. write ``fedq/cli/bench_round.py`` (the command's words joined by ``_``, dashes as ``_``) with
     ``add_arguments(parser)`` and ``run(args) -> int`` (the exit status);
  2. add ``(("bench", "round"), "one line of help")`` to ``COMMANDS`` below.
The module is imported while parsers are built, for every ``fedq --help``: keep torch, pika and the work out
of its top level and import them inside ``run``. Shared options (``--amqp-url``, ``--namespace``, sizes) are
in ``fedq.cli.options``. Raise ``fedq.errors`` types for an operator's mistake; ``main`` makes them one line.

Exit codes (docs/operating.md lists them too):
  0  done
  1  the command failed (a ``FedqError`` without a more specific code, e.g. an incomplete stream)
  2  usage or configuration: a bad option, value or setting (``ConfigError``, argparse)
  3  the broker: unreachable, refused the credentials, vhost or management API (``TransportError``)
  4  a file or the operating system: missing, unreadable or read-only path, port in use (``OSError``)
  130 interrupted (Ctrl-C, SIGINT)
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from fedq import __version__
from fedq.cli.options import HelpFormatter
from fedq.errors import FedqError

EXIT_OS = 4
EXIT_INTERRUPTED = 130

# (command words, one-line help); the module is fedq.cli.<words joined by "_">.
COMMANDS: list[tuple[tuple[str, ...], str]] = [
    (("aggregator",), "run an aggregator worker (one shard of the federation)"),
    (("client",), "run the demo client: a small GPT trained on tinyshakespeare"),
    (("demo",), "run the main demo: an aggregator and four clients on the local broker"),
    (("send",), "stream a safetensors file through the broker, tensor by tensor"),
    (("receive",), "receive a streamed model into a safetensors file"),
    (("status",), "the state of a federation: queues, versions, clients, dead letters"),
    (("broker", "apply"), "apply fedq's topology (definitions.json) to a running broker"),
    (("broker", "definitions"), "print the broker definitions fedq declares"),
    (("broker", "add-client"), "create a least-privilege broker user for a client"),
    (("broker", "remove-client"), "revoke a client's broker user"),
    (("bench", "codecs"), "codec sizes, errors and speeds on real model shapes"),
    (("bench", "stream"), "memory and throughput of regular/container/file streaming"),
    (("bench", "aggregate"), "aggregator memory and fold speed vs number of clients"),
    (("bench", "quality"), "validation loss vs wire bytes for each codec setting"),
    (("bench", "scale"), "the aggregator's loop against 10 to hundreds of clients"),
    (("bench", "robust"), "validation loss of each aggregation rule under attacks; DP epsilon vs loss"),
]


def module_name(words: tuple[str, ...]) -> str:
    return "fedq.cli." + "_".join(words).replace("-", "_")


def _verbose_option() -> argparse.ArgumentParser:
    """``-v`` is accepted before or after the command (``fedq -v status``, ``fedq status -v``)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log debug messages"
    )
    return parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedq",
        description="Federated learning of large models over RabbitMQ: quantized, streamed, asynchronous.",
        epilog="Exit codes: 0 done, 1 failed, 2 usage or configuration, 3 broker, 4 file or system, "
        "130 interrupted. The broker URL comes from --amqp-url or FEDQ_AMQP_URL.",
    )
    parser.add_argument("--version", action="version", version=f"fedq {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages (default: info)")
    top = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    verbose = _verbose_option()
    for words, help_text in COMMANDS:
        parent = top
        if len(words) == 2:
            if words[0] not in groups:
                group = top.add_parser(words[0], help=f"{words[0]} commands")
                groups[words[0]] = group.add_subparsers(
                    dest="subcommand", metavar="SUBCOMMAND", required=True
                )
            parent = groups[words[0]]
        module = importlib.import_module(module_name(words))
        sub = parent.add_parser(
            words[-1],
            help=help_text,
            description=(module.__doc__ or help_text).strip(),
            formatter_class=HelpFormatter,
            parents=[verbose],
        )
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run, _command=" ".join(words))
    return parser


def configure_logging(verbose: bool) -> None:
    """Operator-readable logs on stderr; pika's own chatter only with --verbose."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("pika").setLevel(logging.DEBUG if verbose else logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Parse, run, and turn an operator's mistake into one line on stderr and a documented exit code.

    Only ``FedqError``, ``OSError`` and ``KeyboardInterrupt`` are caught: anything else is a bug in fedq, and
    its traceback is what a bug report needs.
    """
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    prefix = f"fedq {args._command}"
    try:
        return int(args._run(args))
    except FedqError as exc:
        print(f"{prefix}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"{prefix}: error: {_os_error(exc)}", file=sys.stderr)
        return EXIT_OS
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _os_error(exc: OSError) -> str:
    """``[Errno 2] No such file or directory: 'x'`` -> ``x: No such file or directory``."""
    if exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return exc.strerror or str(exc)

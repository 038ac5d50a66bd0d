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
  143 terminated (SIGTERM: a supervisor, ``kill``, ``timeout``)
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

from fedq import __version__
from fedq.cli.config import CONFIG_FILE_ENV, check_keys, defaults_from, load_file, options_of, table_for
from fedq.cli.options import HelpFormatter
from fedq.errors import FedqError

EXIT_OS = 4
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, what a shell reports for a process the signal ended


class _Terminated(BaseException):
    """SIGTERM, raised where the command is, so that its cleanup runs (temporary files, the connection)."""


def _terminate(signum: int, frame: Any) -> None:
    raise _Terminated


# (command words, one-line help); the module is fedq.cli.<words joined by "_">.
COMMANDS: list[tuple[tuple[str, ...], str]] = [
    (("aggregator",), "run an aggregator worker (one shard of the federation)"),
    (("client",), "run the demo client: a small GPT trained on tinyshakespeare"),
    (("demo",), "run the main demo: an aggregator and four clients on the local broker"),
    (("send",), "stream a safetensors file through the broker, tensor by tensor"),
    (("receive",), "receive the newest complete model version into a safetensors file"),
    (("export",), "assemble a model version from the shards' state dirs into one safetensors file"),
    (("status",), "the state of a federation: queues, versions, clients, dead letters"),
    (("broker", "apply"), "apply fedq's topology (definitions.json) to a running broker"),
    (("broker", "definitions"), "print the broker definitions fedq declares"),
    (("broker", "add-client"), "create a least-privilege broker user for a client"),
    (("broker", "remove-client"), "revoke a client's broker user"),
    (("broker", "add-aggregator"), "create a least-privilege broker user for aggregator shards"),
    (("broker", "teardown"), "delete a namespace: its queues, exchanges and fedq's users of it"),
    (("bench", "codecs"), "codec sizes, errors and speeds on real model shapes"),
    (("bench", "stream"), "memory and throughput of regular/container/file streaming"),
    (("bench", "aggregate"), "aggregator memory and fold speed vs number of clients"),
    (("bench", "quality"), "validation loss vs wire bytes for each codec setting"),
    (("bench", "scale"), "the aggregator's loop against 10 to hundreds of clients"),
    (("bench", "intake"), "the aggregator's own CPU per update, folding updates staged in memory"),
    (("bench", "device"), "client encode and aggregator fold on the device found (GPU where present)"),
    (("bench", "round"), "one whole round (receive, train, send, fold, receive), each party a process"),
    (("bench", "robust"), "validation loss of each aggregation rule under attacks; DP epsilon vs loss"),
]


def module_name(words: tuple[str, ...]) -> str:
    return "fedq.cli." + "_".join(words).replace("-", "_")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line naming the fix: argparse printed the command's whole usage
    first (40 lines for ``fedq aggregator``), which buried the error under the options it did not name."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _common_options() -> _Parser:
    """Options of every command, before or after its name (``fedq -v status``, ``fedq status -v``)."""
    parent = _Parser(add_help=False)
    parent.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log debug messages"
    )
    parent.add_argument(
        "--config-file",
        type=Path,
        metavar="TOML",
        default=argparse.SUPPRESS,
        help="option values from a TOML file (env FEDQ_CONFIG_FILE; see docs/operating.md)",
    )
    return parent


def build_parser(
    config: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> argparse.ArgumentParser:
    """Every command's parser; option defaults come from ``environ`` and ``config`` (fedq.cli.config)."""
    return _build(config or {}, environ or {})[0]


def _build(
    config: Mapping[str, Any], environ: Mapping[str, str]
) -> tuple[argparse.ArgumentParser, dict[tuple[str, ...], argparse.ArgumentParser]]:
    common = _common_options()
    parser = _Parser(
        prog="fedq",
        description="Federated learning of large models over RabbitMQ: quantized, streamed, asynchronous.",
        epilog="Exit codes: 0 done, 1 failed, 2 usage or configuration, 3 broker, 4 file or system, "
        "130 interrupted, 143 terminated. Every option can also come from FEDQ_<OPTION> or a TOML file "
        "(--config-file).",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"fedq {__version__}")
    parser.set_defaults(verbose=False)
    top = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    commands: dict[tuple[str, ...], argparse.ArgumentParser] = {}
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
            parents=[common],
        )
        module.add_arguments(sub)
        defaults = defaults_from(sub, table_for(config, words), environ)
        sub.set_defaults(_run=module.run, _command=" ".join(words), **defaults)
        commands[words] = sub
    return parser, commands


def _parse(argv: list[str]) -> argparse.Namespace:
    """Parse with option defaults from the environment and the TOML file named by --config-file (or
    FEDQ_CONFIG_FILE), whose keys are checked against every command's options."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # --config is the aggregator's own
    pre.add_argument("--config-file", type=Path, default=None)
    path = pre.parse_known_args(argv)[0].config_file
    if path is None and os.environ.get(CONFIG_FILE_ENV):
        path = Path(os.environ[CONFIG_FILE_ENV])
    config = load_file(path) if path is not None else {}
    parser, commands = _build(config, os.environ)
    if path is not None:
        check_keys(config, {words: set(options_of(sub)) for words, sub in commands.items()}, path)
    args, extra = parser.parse_known_args(argv)
    if extra:  # argparse leaves these to the top parser, whose line named `fedq`, not the command
        commands[tuple(args._command.split())].error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def configure_logging(verbose: bool) -> None:
    """Operator-readable logs on stderr; pika's own chatter only with --verbose (its errors come as several
    lines per failed attempt; the transport logs one line per attempt with the cause instead)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("pika").setLevel(logging.DEBUG if verbose else logging.CRITICAL)
    # matplotlib logs "generated new fontManager" (INFO) at a machine's first plot: noise under a table
    logging.getLogger("matplotlib").setLevel(logging.DEBUG if verbose else logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Parse, run, and turn an operator's mistake into one line on stderr and a documented exit code.

    Only ``FedqError``, ``OSError`` and ``KeyboardInterrupt`` are caught: anything else is a bug in fedq, and
    its traceback is what a bug report needs.
    """
    prefix = "fedq"
    # Only the main thread may set handlers (a test may call main from another); the aggregator sets its own.
    handles = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if handles else None
    try:
        args = _parse(sys.argv[1:] if argv is None else argv)
        configure_logging(args.verbose)
        prefix = f"fedq {args._command}"
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
    except _Terminated:
        print(f"{prefix}: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    finally:
        if handles:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _os_error(exc: OSError) -> str:
    """``[Errno 2] No such file or directory: 'x'`` -> ``x: No such file or directory``."""
    if exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return exc.strerror or str(exc)

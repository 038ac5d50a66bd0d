"""Options that several commands share, and the help formatter every command uses.

Nothing here imports torch or pika: ``fedq --help`` builds every parser, and must stay well under a second.
"""

from __future__ import annotations

import argparse
import errno
import re
import tempfile
from pathlib import Path

from fedq.errors import ConfigError
from fedq.topology import DEFAULT_CHUNK_BYTES, DEFAULT_NAMESPACE
from fedq.transport import default_url
from fedq.units import parse_size

_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):[^@\s]*@", re.IGNORECASE)


def redact(text: str) -> str:
    """Hide the password of every URL in ``text``: ``amqp://alice:s3cret@host`` -> ``amqp://alice:***@host``."""
    return _CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default once, and never a password.

    The default is appended only where the help text does not already say it and where it carries
    information (not None or False); every URL in the final text has its password replaced by ``***``.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        uninformative = action.default is None or action.default is False or action.default == []
        if "default" in text or uninformative or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)

    def _expand_help(self, action: argparse.Action) -> str:
        return redact(super()._expand_help(action))


def size(text: str) -> int:
    """An argparse ``type``: a memory size in the one unit fedq uses (see fedq.units)."""
    try:
        return parse_size(text)
    except ConfigError as exc:  # argparse reports an ArgumentTypeError as a usage error, exit status 2
        raise argparse.ArgumentTypeError(str(exc)) from exc


def counts(text: str) -> list[int]:
    """An argparse ``type``: comma-separated whole numbers of at least 1 (``--clients 10,100,500``)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"not comma-separated counts of at least 1: {text!r} (e.g. 1,8,32)")
    return values


def positive(text: str) -> int:
    """An argparse ``type``: a whole number of at least 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a whole number of at least 1: {text!r}")
    return int(text)


def numbers(text: str) -> list[float]:
    """An argparse ``type``: comma-separated numbers, none for an empty text (``--dp-noise 0.5,1,2``)."""
    try:
        return [float(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not comma-separated numbers: {text!r} (e.g. 0.5,1,2)") from None


def add_amqp_url(parser: argparse.ArgumentParser) -> None:
    """``--amqp-url``: from FEDQ_AMQP_URL or the local broker; shown in --help without its password."""
    parser.add_argument(
        "--amqp-url",
        default=default_url(),
        help="broker URL with credentials and vhost (env FEDQ_AMQP_URL; default: %(default)s)",
    )


def add_namespace(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--namespace", default=DEFAULT_NAMESPACE, help="prefix of every exchange and queue of the federation"
    )


def add_chunk_bytes(parser: argparse.ArgumentParser, what: str = "payload bytes per chunk") -> None:
    parser.add_argument("--chunk-bytes", type=size, default=DEFAULT_CHUNK_BYTES, help=what)


def check_writable(path: Path) -> None:
    """Refuse an output file that cannot be created (a missing or read-only directory, a directory in its
    place) before anything is received: otherwise the command fails only at the end, naming a temporary file.
    A file is created and removed to find out, since permission bits do not tell (root, read-only mounts)."""
    if path.is_dir():
        raise OSError(errno.EISDIR, "a directory is in the way", f"cannot write {path}")
    try:
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".check"):
            pass
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, f"cannot write {path}") from exc

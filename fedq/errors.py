"""One hierarchy of typed errors.

Every error carries a short machine-readable ``reason`` (a slug such as ``checksum`` or ``stale``). Workers
use it as the ``reason`` label of the rejection metric and as the ``x-fedq-reason`` header of the
dead-lettered message, so an operator can count and grep failures without parsing prose. Every class also
carries the ``exit_code`` with which the ``fedq`` command ends when it stops on one (listed in
``fedq/cli/__init__.py`` and docs/operating.md), so a supervisor can tell a bad setting from a lost broker.
"""

from __future__ import annotations


class FedqError(Exception):
    """Base of every error fedq raises on purpose."""

    reason: str = "error"
    exit_code: int = 1

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class ConfigError(FedqError):
    """A setting or argument is invalid; the message names it and what is accepted."""

    reason = "config"
    exit_code = 2


class CodecError(FedqError):
    """A tensor cannot be encoded or a payload cannot be decoded by its codec."""

    reason = "codec"


class WireError(FedqError):
    """A message does not follow the wire format (bad magic, version, checksum, header or sizes)."""

    reason = "wire"


class TransportError(FedqError):
    """The broker refused, returned or lost a message, or the connection could not be (re)established."""

    reason = "transport"
    exit_code = 3


class StreamError(FedqError):
    """A container stream is inconsistent or incomplete (missing chunks, manifest mismatch, timeout)."""

    reason = "stream"


class StateError(FedqError):
    """A file of an aggregator's state directory (its state, a version's record) is not what fedq wrote there:
    truncated, edited or another program's. A file problem (exit 4): the operator restores or removes it."""

    reason = "state"
    exit_code = 4


class NoSpaceError(FedqError):
    """A directory where fedq keeps its state (a client's scratch directory: ``fedq.scratch``; an aggregator's
    state directory) has no room left. A file problem (exit 4): the message names the directory and what to
    do."""

    reason = "no_space"
    exit_code = 4


class BenchError(FedqError):
    """A benchmark's run failed: a process it started, or a count it checks (the message says where its log
    is). One line and exit 1, as any failed command, not a traceback: the bench did what it was asked and the
    run it measured went wrong."""

    reason = "bench"


class RejectedUpdate(FedqError):
    """The aggregator refuses an update: stale, unauthorised, unknown tensor, wrong shape, norm too large."""

    reason = "rejected"


class FederationEnded(StreamError):
    """The aggregator announced its final version and the client already has it: nothing newer will come."""

    reason = "ended"

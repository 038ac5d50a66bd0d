"""Benchmarks: commands that print tables and write JSON. They measure; tests assert."""

from __future__ import annotations

from collections.abc import Sequence

from fedq.errors import ConfigError


def broker_url(amqp_url: str | None) -> str:
    """The broker a bench runs against (``--amqp-url``, else ``FEDQ_AMQP_URL`` or the local one), connected to
    once before anything starts: a bench is run by hand, so it fails at once with the cause (exit 3), as
    ``fedq send`` does, instead of its aggregator and clients each retrying for a minute."""
    from fedq.transport import connect, default_url

    url = amqp_url or default_url()
    with connect(url, connect_timeout=0):
        return url


def chosen(option: str, text: str | None, known: Sequence[str]) -> list[str]:
    """The comma-separated names of ``option`` (every one of ``known`` when not given), refused before
    anything runs where one is unknown: a typo must not end a long run without the row it was for."""
    names = text.split(",") if text else list(known)
    if unknown := [name for name in names if name not in known]:
        raise ConfigError(f"{option}: unknown {unknown}; choose from {', '.join(known)}")
    return names

"""Sizes in one unit everywhere: every memory option takes ``512MiB``, ``2GB`` or a plain number of bytes,
and every size fedq prints is binary (KiB, MiB, GiB). No torch here: the CLI parses sizes in its parsers."""

from __future__ import annotations

import re

from fedq.errors import ConfigError

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KIB": 1 << 10,
    "MIB": 1 << 20,
    "GIB": 1 << 30,
}


def parse_size(text: str | int) -> int:
    """'512MiB', '2GB', '1048576' (or an int) -> bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if match is None or match.group(2).upper() not in _UNITS:
        raise ConfigError(f"not a size: {text!r} (e.g. 512MiB, 2GB, or bytes)", reason="bad_size")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")

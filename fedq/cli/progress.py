"""Progress bars of ``fedq send`` and ``fedq receive``: tqdm's, in bytes on the wire, with rate and ETA.

tqdm replaces a hand-written bar: it measures its rate from its own start (the old one counted from process
start, imports and connecting included), smooths it, and handles terminals and their widths. The bar is off
under ``--quiet`` and when stderr is not a terminal, so logs and pipes never fill with carriage returns.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from tqdm import tqdm

if TYPE_CHECKING:
    from fedq.streaming import Manifest


def byte_bar(label: str, total: int | None = None, *, quiet: bool = False) -> tqdm:
    return tqdm(
        total=total,
        desc=label,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=quiet or not sys.stderr.isatty(),
        dynamic_ncols=True,
    )


def wire_estimate(manifest: Manifest) -> int:
    """Payload bytes of a container with each codec's default parameters: close enough for a bar's total."""
    from fedq.codecs import get_codec

    return sum(get_codec(t.codec).payload_nbytes(t.numel) for t in manifest.tensors)


def add_to_total(bar: tqdm, manifest: Manifest) -> None:
    """A receiver learns each container's size from its manifest (one per shard)."""
    bar.total = (bar.total or 0) + wire_estimate(manifest)
    bar.refresh()

"""The digest of version 0: how a client that already holds the initial weights skips downloading them.

In an LLM federation every site usually holds the pretrained checkpoint the aggregator was started with
(``fedq aggregator --init``), yet version 0 would travel whole in fp32 to every client (5.99 GB each for
Llama-3.2-1B). So each aggregator shard hashes, once at its first start, the float32 values that clients'
stores hold after receiving version 0 of its tensors, and every announcement carries the shards' digests
(``Announcement.initial``). A client receiving for the first time hashes its own model's tensors the same way
(``model_digests``); where every shard's digest matches it holds version 0 bit for bit already, takes it from
its own tensors and reads only what came after (``fedq.client``). A single differing bit anywhere changes the
digest and the client downloads as before: correct by construction, at the cost of one read of the model
(seconds) against gigabytes of download.

What is hashed (scheme 1, ``fedq.protocol.INITIAL_SCHEME``), per shard: for each of the shard's tensors in
the announcement's order, its name in UTF-8, a NUL byte, then its elements as little-endian float32 in
row-major order; SHA-256 over it all. The values are version 0 as clients decode it: x̂_0 = the initial
tensors in float32 when versions travel as deltas (their snapshots are fp32), or the initial tensors through
the model codec (``choose_codec`` of each tensor) when versions travel whole. A client converts its tensors
to float32 exactly, so a bf16 model matches only where version 0's values are bf16 values: an init that was
bf16 itself, or ``--model-codec bf16``.
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch

from fedq.codecs import choose_codec
from fedq.reconstruction import is_delta_codec
from fedq.streaming import shard_of

_STEP = 1 << 22  # elements hashed at a time (16 MiB of float32)


def digest(names: Sequence[str], pieces: Callable[[str], Iterator[torch.Tensor]]) -> str:
    """SHA-256 (hex) of tensors ``names`` in this order, each given as consecutive 1-D float32 pieces."""
    if sys.byteorder != "little":
        raise NotImplementedError("the version-0 digest is defined over little-endian float32")
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode() + b"\0")
        for piece in pieces(name):
            h.update(piece.to("cpu", torch.float32).contiguous().numpy().data.cast("B"))
    return h.hexdigest()


def slices(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """A tensor's elements a bounded slice at a time (never a float32 copy of a whole bf16 embedding)."""
    flat = tensor.detach().reshape(-1)
    for lo in range(0, flat.numel(), _STEP):
        yield flat[lo : lo + _STEP]


def shard_digest(model: Mapping[str, torch.Tensor], order: Sequence[str], model_codec: str) -> str:
    """The aggregator's side: the digest of one shard's version 0, ``order`` being its tensors in the
    announcement's order, as clients will decode it in ``model_codec``."""

    def decoded(name: str) -> Iterator[torch.Tensor]:
        tensor = model[name]
        codec = choose_codec(name, tuple(tensor.shape), model_codec)
        for piece in slices(tensor):
            meta, payload = codec.encode(piece.to("cpu"))
            yield codec.decode(meta, payload, piece.numel(), torch.device("cpu"))

    if is_delta_codec(model_codec):  # x̂_0 is the model's own float32 values (its snapshot codec is lossless)
        return digest(order, lambda name: slices(model[name]))
    return digest(order, decoded)


def model_digests(
    tensors: Mapping[str, torch.Tensor], announced: Sequence[tuple[str, tuple[int, ...]]], shards: int
) -> list[str]:
    """The client's side: the digest of each shard's part of ``tensors`` (a model's, by global name), with
    tensors assigned to shards as the aggregator assigns them."""
    assignment = shard_of({name: 4 * math.prod(shape) for name, shape in announced}, shards)
    return [
        digest(
            [name for name, _ in announced if assignment[name] == shard],
            lambda name: slices(tensors[name]),
        )
        for shard in range(shards)
    ]

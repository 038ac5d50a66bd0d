"""Codec names -> classes, and building codecs from names and parameters (trusted or from a header)."""

from __future__ import annotations

from typing import Any

from fedq.codecs.base import Codec
from fedq.codecs.blockwise import Fp4, Int8, Nf4
from fedq.codecs.floats import Bf16, Fp16, Fp32
from fedq.errors import CodecError

CODECS: dict[str, type[Codec]] = {c.name: c for c in (Fp32, Fp16, Bf16, Int8, Nf4, Fp4)}


def get_codec(name: str, **params: Any) -> Codec:
    """A codec by name with its default or given parameters; raises CodecError for unknown names or params."""
    try:
        cls = CODECS[name]
    except (KeyError, TypeError):
        raise CodecError(f"unknown codec {name!r}; known codecs: {', '.join(sorted(CODECS))}") from None
    try:
        return cls(**params)
    except TypeError as exc:
        raise CodecError(f"invalid parameters {params!r} for codec {name!r}: {exc}") from None


def codec_from_header(name: Any, params: Any) -> Codec:
    """Build a codec from untrusted header fields, validating their types first."""
    if (
        not isinstance(name, str)
        or not isinstance(params, dict)
        or not all(isinstance(k, str) for k in params)
    ):
        raise CodecError(f"codec header must be a name and a map of parameters, got {name!r}, {params!r}")
    return get_codec(name, **params)

"""Per-tensor policy: the codec a tensor actually travels in, given the one the user asked for."""

from __future__ import annotations

import math
from collections.abc import Sequence

from fedq.codecs.base import Codec
from fedq.codecs.blockwise import FourBit, Int8
from fedq.codecs.floats import Fp32
from fedq.codecs.registry import get_codec
from fedq.errors import CodecError

# Tensors that are 1-D (norm gains, biases) or smaller than this stay in fp32 when a quantizing codec is
# asked for. Below 4096 elements (one int8 block) a tensor is its own block, and all such tensors together are
# a negligible share of an LLM's bytes (Llama-3.2-1B: 33 norm vectors, 67,584 of 1.236e9 parameters, 0.005%;
# GPT-2: 121,344 of 124.4e6, 0.1%), so quantizing them saves nothing measurable, while norm gains and biases
# scale or shift every activation they touch.
MIN_QUANTIZED_ELEMENTS = 4096


def choose_codec(name: str, shape: Sequence[int], requested: str) -> Codec:
    """The codec for tensor ``name`` of ``shape``: ``requested`` at its defaults, or fp32 for tiny tensors.

    16- and 32-bit codecs carry no block metadata, so they are kept as requested whatever the size.
    """
    try:
        codec = get_codec(requested)
    except CodecError as exc:
        raise CodecError(f"tensor {name!r}: {exc}") from None
    quantizing = isinstance(codec, Int8 | FourBit)
    if quantizing and (len(shape) < 2 or math.prod(shape) < MIN_QUANTIZED_ELEMENTS):
        return Fp32()
    return codec

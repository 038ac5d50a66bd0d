"""Per-tensor policy: the codec a tensor actually travels in, given the one the user asked for."""

from __future__ import annotations

import math
from collections.abc import Sequence

from fedq.codecs.base import Codec
from fedq.codecs.blockwise import FourBit, Int8
from fedq.codecs.floats import Fp32
from fedq.codecs.registry import get_codec
from fedq.errors import CodecError

# 1-D tensors (norm gains, biases) stay in fp32 when a quantizing codec is asked for: they are a negligible
# share of an LLM's bytes (Llama-3.2-1B: 33 norm vectors, 67,584 of 1.236e9 parameters, 0.005%; GPT-2:
# 121,344 of 124.4e6, 0.1%), so quantizing them saves nothing measurable, while norm gains and biases scale or
# shift every activation they touch. Matrices are quantized whenever that saves bytes, however small: LoRA
# adapters are small matrices (rank x width) and are all there is to send; a size floor (4,096 elements until
# 2026-11) kept tiny adapters in fp32 (a tiny Llama's LoRA update: 1.4x instead of 6x compression). Measured
# on rank 8-16 adapters of 2k-8k-wide layers: docs/huggingface.md.


def choose_codec(name: str, shape: Sequence[int], requested: str) -> Codec:
    """The codec for tensor ``name`` of ``shape``: ``requested`` at its defaults, or fp32 for a 1-D tensor or
    a matrix too small for the codec's block metadata to pay (its payload would not be smaller than fp32's).

    16- and 32-bit codecs carry no block metadata, so they are kept as requested whatever the size.
    """
    try:
        codec = get_codec(requested)
    except CodecError as exc:
        raise CodecError(f"tensor {name!r}: {exc}") from None
    if not isinstance(codec, Int8 | FourBit):
        return codec
    count = math.prod(shape)
    if len(shape) < 2 or codec.payload_nbytes(count) >= Fp32().payload_nbytes(count):
        return Fp32()
    return codec

"""Full- and half-precision codecs: fp32 (raw), fp16 with a per-chunk scale, bf16."""

from __future__ import annotations

from typing import Any

import torch

from fedq.codecs.base import Buffer, Codec, as_uint8, to_payload
from fedq.errors import CodecError

# fp16 keeps full precision only above 2**-14; deltas of ~1e-3 fall below it. Scaling each chunk so that its
# largest magnitude maps to 2**14 keeps every value within 2**-28 of that maximum in the normal range.
_FP16_TARGET = 2.0**14


class Fp32(Codec):
    name = "fp32"

    def payload_nbytes(self, count: int) -> int:
        return 4 * count

    def encode(self, x: torch.Tensor) -> tuple[dict[str, Any], Buffer]:
        return {}, to_payload(x.to(torch.float32))

    def decode(self, meta: dict[str, Any], payload: Buffer, count: int, device: torch.device) -> torch.Tensor:
        return as_uint8(payload, device).view(torch.float32)


class Bf16(Codec):
    name = "bf16"

    def payload_nbytes(self, count: int) -> int:
        return 2 * count

    def encode(self, x: torch.Tensor) -> tuple[dict[str, Any], Buffer]:
        return {}, to_payload(x.to(torch.bfloat16))

    def decode(self, meta: dict[str, Any], payload: Buffer, count: int, device: torch.device) -> torch.Tensor:
        return as_uint8(payload, device).view(torch.bfloat16).to(torch.float32)


class Fp16(Codec):
    name = "fp16"

    def payload_nbytes(self, count: int) -> int:
        return 2 * count

    def encode(self, x: torch.Tensor) -> tuple[dict[str, Any], Buffer]:
        absmax = float(x.abs().max()) if x.numel() else 0.0
        scale = absmax / _FP16_TARGET if absmax > 0 else 1.0
        return {"scale": scale}, to_payload((x.to(torch.float32) / scale).to(torch.float16))

    def decode(self, meta: dict[str, Any], payload: Buffer, count: int, device: torch.device) -> torch.Tensor:
        scale = meta.get("scale")
        if not isinstance(scale, float) or not (scale > 0.0) or scale == float("inf"):
            raise CodecError(f"fp16 chunk has an invalid scale {scale!r}: expected a positive finite float")
        return as_uint8(payload, device).view(torch.float16).to(torch.float32) * scale

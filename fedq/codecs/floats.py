"""Full- and half-precision codecs: fp32 (raw), fp16 with a per-chunk scale, bf16 (raw)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from fedq.codecs.base import (
    Buffer,
    Codec,
    as_uint8,
    check_out,
    empty,
    finite,
    host_bytes,
    host_views,
    require,
    slices,
    span,
)
from fedq.codecs.batch import Layout, payload_spans
from fedq.errors import CodecError
from fedq.threads import kernel

# fp16 keeps full precision only above 2**-14; deltas of ~1e-3 fall below it (97% of them, measured). Scaling
# each chunk so that its largest magnitude maps to 2**14 keeps every value down to 2**-28 of that maximum in
# the normal range, and leaves a factor of 4 of headroom below the fp16 maximum (65504).
_FP16_TARGET = 2.0**14
_MIN_SCALE = 2.0**-114
_MAX_SCALE = 2.0**112  # 65504 * scale stays below the fp32 maximum
# elements converted per step: the fp32 temporary of a step stays in cache instead of doubling peak memory
_STEP = 1 << 20


class Fp32(Codec):
    name = "fp32"

    def payload_nbytes(self, count: int) -> int:
        return 4 * count

    def cut(self, payload: Buffer, count: int, a: int, b: int) -> Buffer:
        return span(payload, 4 * a, 4 * b)

    @kernel
    def encode_on_device(self, x: torch.Tensor) -> tuple[dict[str, Any], torch.Tensor]:
        x = self.check_input(x)
        return {}, x.to(torch.float32).view(torch.uint8)

    @kernel
    def decode(self, meta: dict[str, Any], payload: Buffer, count: int, device: torch.device) -> torch.Tensor:
        self.check_payload(meta, payload, count)
        out = empty(count, torch.float32, device)
        out.view(torch.uint8).copy_(as_uint8(payload, device))
        return out

    @kernel
    def decode_add(
        self, meta: dict[str, Any], payload: Buffer, count: int, out: torch.Tensor, alpha: float
    ) -> None:
        """The payload's values are added where they lie (a view on the CPU): no decoded copy."""
        self.check_payload(meta, payload, count)
        check_out(self.name, out, count)
        values = as_uint8(payload, out.device).view(torch.float32)
        require(finite(values), lambda: CodecError("fp32: payload holds NaN or Inf", reason="nonfinite"))
        out.add_(values, alpha=alpha)

    @kernel
    def check_rows(
        self, chunks: Sequence[tuple[dict[str, Any], Buffer, int]], device: torch.device | str = "cpu"
    ) -> bool:
        """Finite values are all there is to check (``check``'s float64 Σ x² of float32 values is finite
        exactly when they are): one reduction over every chunk's values."""
        try:
            for meta, payload, count in chunks:
                self.check_payload(meta, payload, count)
        except CodecError:
            return False
        views = host_views([p for _, p, _ in chunks], device)
        return views is not None and bool(finite(host_bytes(views).view(torch.float32)))

    @kernel
    def decode_add_rows(
        self,
        chunks: Sequence[tuple[dict[str, Any], Buffer]],
        count: int,
        out: torch.Tensor,
        alphas: list[float],
    ) -> bool:
        """One finiteness check for all of them, then ``out.add_`` of each row in turn (``decode_add``'s
        op)."""
        rows = self.payload_rows(chunks, count, out)
        if rows is None:
            return False
        values = rows.view(torch.float32)
        if not bool(finite(values)):
            return False
        for row, alpha in zip(values, alphas, strict=True):
            out.add_(row, alpha=alpha)
        return True

    def encode_batch(self, flat: torch.Tensor, layout: Layout) -> tuple[list[dict[str, Any]], torch.Tensor]:
        """The slices' bytes back to back: one copy."""
        views = layout.views(self.check_input(flat).to(torch.float32))
        blob = torch.cat(views) if views else flat.new_empty(0, dtype=torch.float32)
        return [{} for _ in views], blob.view(torch.uint8)

    def decode_batch(
        self, metas: list[dict[str, Any]], blob: torch.Tensor, layout: Layout, out: torch.Tensor
    ) -> None:
        self.check_batch(metas, blob, layout)
        if blob.storage_offset() % 4:
            blob = blob.clone()  # float32 values must be 4-byte aligned to be viewed
        values = blob.to(out.device).view(torch.float32)
        out.zero_()
        for (lo, hi), view in zip(payload_spans(list(layout.counts)), layout.views(out), strict=True):
            view.copy_(values[lo:hi])


class Bf16(Codec):
    name = "bf16"

    def payload_nbytes(self, count: int) -> int:
        return 2 * count

    def cut(self, payload: Buffer, count: int, a: int, b: int) -> Buffer:
        return span(payload, 2 * a, 2 * b)

    @kernel
    def encode_on_device(self, x: torch.Tensor) -> tuple[dict[str, Any], torch.Tensor]:
        x = self.check_input(x)
        return {}, empty(x.numel(), torch.bfloat16, x.device).copy_(x).view(torch.uint8)

    @kernel
    def decode(self, meta: dict[str, Any], payload: Buffer, count: int, device: torch.device) -> torch.Tensor:
        self.check_payload(meta, payload, count)
        return empty(count, torch.float32, device).copy_(as_uint8(payload, device).view(torch.bfloat16))


class Fp16(Codec):
    """fp16 of x / scale, with scale = absmax / 2**14 per chunk (meta ``scale``, a float64)."""

    name = "fp16"
    meta_keys = frozenset({"scale"})

    def payload_nbytes(self, count: int) -> int:
        return 2 * count

    def cut(self, payload: Buffer, count: int, a: int, b: int) -> Buffer:
        return span(payload, 2 * a, 2 * b)

    @kernel
    def encode_on_device(self, x: torch.Tensor) -> tuple[dict[str, Any], torch.Tensor]:
        x = self.check_input(x)
        low, high = (float(v) for v in torch.aminmax(x)) if x.numel() else (0.0, 0.0)  # no |x| temporary
        if not (math.isfinite(low) and math.isfinite(high)):
            raise CodecError("fp16: cannot encode NaN or Inf", reason="nonfinite")
        # the floor keeps 1/scale finite in fp32; chunks that small decode to ~zero, an error below 1e-30
        absmax = max(-low, high)
        scale = max(absmax / _FP16_TARGET, _MIN_SCALE) if absmax > 0 else 1.0
        out = empty(x.numel(), torch.float16, x.device)
        for lo, hi in slices(x.numel(), _STEP):
            torch.mul(x[lo:hi].to(torch.float32), 1.0 / scale, out=out[lo:hi])
        return {"scale": scale}, out.view(torch.uint8)

    @kernel
    def decode(self, meta: dict[str, Any], payload: Buffer, count: int, device: torch.device) -> torch.Tensor:
        self.check_payload(meta, payload, count)
        scale = meta.get("scale")
        if not isinstance(scale, float) or not (0.0 < scale <= _MAX_SCALE):
            raise CodecError(f"fp16 chunk has an invalid scale {scale!r}: expected a float in (0, 2**112]")
        out = empty(count, torch.float32, device)
        return out.copy_(as_uint8(payload, device).view(torch.float16)).mul_(scale)

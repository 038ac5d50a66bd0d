"""Blockwise absmax quantization: int8, and 4-bit nf4/fp4 whose block scales are themselves quantized.

Every codec here works on cache-sized steps of the input (``_STEP`` elements, whole alignment units) into
preallocated payload and temporary buffers, so the extra memory of an encode is a few MiB per thread whatever
the tensor size, and no Python code runs per block or per element. Steps write disjoint parts of the output,
so they run on several threads at one torch thread each (``fedq.threads.for_each_step``), and a payload is
the same bytes whatever the thread count.

Buffer layouts (little-endian; fp32 sections first so that they can be viewed in place):

- int8:  absmax fp32[nblocks] | codes int8[count]                       x ~= code * absmax / 127
- nf4/fp4: group_step fp32[ngroups] | group_min fp32[ngroups] | scale codes uint8[nblocks]
  | packed uint8[ceil(count/2)]; block scale s = group_min + code * group_step (256 blocks per group),
  x ~= s * levels[nibble]; the element at an even index is in the high nibble of its byte.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from fedq.codecs.base import (
    Buffer,
    Codec,
    as_uint8,
    check_out,
    deferred,
    empty,
    host_bytes,
    host_views,
    join,
    require,
    slices,
    span,
)
from fedq.codecs.batch import Layout, payload_spans
from fedq.errors import CodecError
from fedq.threads import for_each_step, kernel

_STEP = 1 << 20  # elements per step (4 MiB of fp32 temporaries): the fastest of 2**16..2**22, measured
_FOLD_STEP = 1 << 18  # decode_add's CPU step: its 1 MiB scratch stays in L2 while it is added to the sum
# A batch of small slices (``encode_batch``) is a few MiB: steps of 512 KiB of float32 keep its scratch in
# the heap's reused memory (4 MiB steps were fresh pages, faulted in at every call)
_BATCH_STEP = 1 << 17
# On a GPU the step only bounds the scratch; fewer, larger kernels win. Measured on an H200, nf4 fold of 4 MiB
# chunks: 1.5 G parameters/s at 2**18, 2.9 at 2**24 (int8, whose step is _STEP, gained 5%).
_GPU_FOLD_STEP = 1 << 24
_TINY = 2.0**-112  # block maxima below this count as 0, keeping reciprocals like 2048/absmax finite in fp32
GROUP = 256  # blocks per double-quantization group: one fp32 step + one fp32 minimum per group
# A 4-bit block's scale is this fraction of its absmax: the one or two largest elements are clipped by <= 3%,
# and every other element gets a 3% finer grid. Measured rel-L2 at block 64, scale absmax -> 0.97 absmax:
# nf4 N(0,1) 0.0920 -> 0.0913, Laplace 0.1036 -> 0.1024, Student-t(3) 0.1237 -> 0.1220, uniform 0.0913 ->
# 0.0876; fp4 N(0,1) 0.1056 -> 0.1050, t(3) 0.1263 -> 0.1249. Best of {1, 0.98, 0.97, 0.95} on all data
# but uniform.
SHRINK = 0.97
_SAFE_SCALE = 2.0**126  # a block-scale bound below this cannot overflow however float32 rounds on the way
_CELLS = 2048  # encode look-up table resolution: [-1, 1] in 2*_CELLS cells, adds <= 1/_CELLS to the error


def _check_block(codec: str, block: Any, lo: int, hi: int) -> int:
    if not isinstance(block, int) or isinstance(block, bool) or not lo <= block <= hi or block & (block - 1):
        raise CodecError(f"{codec}: block must be a power of two int in [{lo}, {hi}], got {block!r}")
    return block


def _fp32_rows(x: torch.Tensor, lo: int, hi: int, block: int, buf: torch.Tensor | None) -> torch.Tensor:
    """x[lo:hi] as float32 rows of ``block``, zero-padded; a view of x when it already has that form.

    Zero padding changes neither a block's maximum nor any other element's code.
    """
    m = hi - lo
    rows = -(-m // block)
    if x.dtype == torch.float32 and m == rows * block:
        return x[lo:hi].view(rows, block)
    assert buf is not None
    out = buf[: rows * block]
    out[:m].copy_(x[lo:hi])
    out[m:].zero_()
    return out.view(rows, block)


def _fits(absmax: torch.Tensor) -> torch.Tensor:
    """Whether every code, -128 included, times its block's absmax/127 is finite (0-d bool, on the device)."""
    if not absmax.numel():
        return torch.ones((), dtype=torch.bool, device=absmax.device)
    return torch.isfinite(absmax.amax() * (128.0 / 127.0))


def _needs_copy(x: torch.Tensor, block: int) -> bool:
    return x.dtype != torch.float32 or x.numel() % block != 0


def _check_finite(name: str, values: torch.Tensor) -> None:
    # a NaN would otherwise become an arbitrary code
    require(
        torch.isfinite(values).all(),
        lambda: CodecError(f"{name}: cannot encode NaN or Inf", reason="nonfinite"),
    )


def _check_scales(name: str, scales: torch.Tensor) -> None:
    """Refuse a negative, NaN or infinite scale. One reduction: NaN propagates to both extremes, and every
    check of a small chunk pays per op (measured: an nf4 chunk of 40 K elements checked in 236 us, 188 of
    them unpacking it, most of that per-op overhead)."""
    if not scales.numel():
        return
    low, high = torch.aminmax(scales)
    require(
        (low >= 0.0) & (high < math.inf),
        lambda: CodecError(f"{name}: payload holds a negative, NaN or infinite scale"),
    )


class Int8(Codec):
    """Blockwise absmax int8: round(x * 127 / absmax) per block of ``block`` elements, fp32 absmax per block.

    Default block 4096, by measurement on N(0, 0.02), 2**24 elements: the smallest power of two within the
    25.03%-of-fp32 budget (1 + 4/4096 bytes per element = 25.024%). rel-L2 by block: 256 0.0070 (25.39%),
    1024 0.0079 (25.10%), 2048 0.0083 (25.05%), 4096 0.0087, 16384 0.0095, 65536 0.0101; encode and decode
    speed hardly depend on it (1.1-1.3 and 1.8-1.9 G elem/s, one thread, for all of these blocks).
    """

    name = "int8"

    def __init__(self, block: int = 4096) -> None:
        self.block = _check_block(self.name, block, 64, 1 << 20)

    @property
    def alignment(self) -> int:
        return self.block

    def config(self) -> dict[str, Any]:
        return {"block": self.block}

    def payload_nbytes(self, count: int) -> int:
        return 4 * -(-count // self.block) + count

    def cut(self, payload: Buffer, count: int, a: int, b: int) -> Buffer:
        """absmax of the blocks of a..b | their codes."""
        nblocks = -(-count // self.block)
        first, last = a // self.block, -(-b // self.block)
        return join(payload, [(4 * first, 4 * last), (4 * nblocks + a, 4 * nblocks + b)])

    @kernel
    def encode_on_device(self, x: torch.Tensor) -> tuple[dict[str, Any], torch.Tensor]:
        x = self.check_input(x)
        n, b = x.numel(), self.block
        nblocks = -(-n // b)
        out = empty(self.payload_nbytes(n), torch.uint8, x.device)
        absmax, codes = out[: 4 * nblocks].view(torch.float32), out[4 * nblocks :].view(torch.int8)
        step = b * max(1, _STEP // b)
        size, copy = min(step, nblocks * b), _needs_copy(x, b)

        def scratch() -> tuple[torch.Tensor, torch.Tensor | None]:
            tmp = torch.empty(size, dtype=torch.float32, device=x.device)
            return tmp, torch.empty_like(tmp) if copy else None

        def encode_step(s: tuple[torch.Tensor, torch.Tensor | None], lo: int, hi: int) -> None:
            tmp, buf = s
            rows = _fp32_rows(x, lo, hi, b, buf)
            t = tmp[: rows.numel()].view_as(rows)
            a = torch.abs(rows, out=t).amax(dim=1)
            _check_finite(self.name, a)
            absmax[lo // b : lo // b + len(a)] = a
            torch.mul(rows, (127.0 / a.clamp_min(_TINY))[:, None], out=t)
            codes[lo:hi].copy_(t.view(-1)[: hi - lo].round_())

        for_each_step(encode_step, scratch, n, step, x.device)
        return {}, out

    def _unpack(
        self, meta: dict[str, Any], payload: Buffer, count: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(block absmax, codes) of a checked payload, on ``device``."""
        self.check_payload(meta, payload, count)
        nblocks = -(-count // self.block)
        buf = as_uint8(payload, device)
        absmax, codes = buf[: 4 * nblocks].view(torch.float32), buf[4 * nblocks :].view(torch.int8)
        _check_scales(self.name, absmax)
        return absmax, codes

    @staticmethod
    def _may_overflow(absmax: torch.Tensor) -> bool:
        """Whether a code of -128 (-128/127 of its absmax) could overflow float32."""
        return bool(absmax.numel()) and not bool(_fits(absmax))

    @kernel
    def decode(self, meta: dict[str, Any], payload: Buffer, count: int, device: torch.device) -> torch.Tensor:
        b = self.block
        absmax, codes = self._unpack(meta, payload, count, device)
        scale = absmax / 127.0
        out = empty(count, torch.float32, device)

        def decode_step(_: None, lo: int, hi: int) -> None:
            # int8 * float32 in one mul takes a slow mixed-type path (measured 5x slower than convert + mul)
            rows = out[lo:hi].copy_(codes[lo:hi])
            full = (hi - lo) // b
            rows[: full * b].view(full, b).mul_(scale[lo // b : lo // b + full, None])
            rows[full * b :].mul_(scale[lo // b + full : lo // b + full + 1])

        for_each_step(decode_step, lambda: None, count, b * max(1, _STEP // b), torch.device(device))
        return out

    @kernel
    def decode_add(
        self, meta: dict[str, Any], payload: Buffer, count: int, out: torch.Tensor, alpha: float
    ) -> None:
        """Codes converted a cache-sized step at a time, then ``out += codes * (alpha * absmax / 127)``."""
        check_out(self.name, out, count)
        b = self.block
        absmax, codes = self._unpack(meta, payload, count, out.device)
        if deferred(out.device):
            # no host decision on a GPU: a block maximum within 1/128 of the float32 limit (no real update
            # has one) is refused there instead of being decoded the generic way
            require(_fits(absmax), lambda: CodecError(f"{self.name}: block maximum near the float32 limit"))
        elif self._may_overflow(absmax):  # the generic path checks the decoded values themselves
            super().decode_add(meta, payload, count, out, alpha)
            return
        scale = absmax * (alpha / 127.0)
        step = b * max(1, _STEP // b)

        def scratch() -> torch.Tensor:
            return torch.empty(min(step, count), dtype=torch.float32, device=out.device)

        def add_step(tmp: torch.Tensor, lo: int, hi: int) -> None:
            _add_rows(out[lo:hi], tmp[: hi - lo].copy_(codes[lo:hi]), scale[lo // b :], b)

        for_each_step(add_step, scratch, count, step, out.device)

    @kernel
    def sq_norm(
        self, meta: dict[str, Any], payload: Buffer, count: int, device: torch.device | str = "cpu"
    ) -> float:
        """Σ x² without decoding: Σ_blocks (absmax/127)² · Σ code², codes squared in cache-sized steps."""
        dev = torch.device(device)
        absmax, codes = self._unpack(meta, payload, count, dev)
        b, nblocks = self.block, len(absmax)
        if self._may_overflow(absmax):  # code * scale can overflow fp32 in decode: decode it
            return super().sq_norm(meta, payload, count, dev)
        scale = absmax / 127.0
        sums = torch.zeros(nblocks, dtype=torch.float64, device=dev)
        step = b * max(1, _STEP // b)
        tmp = torch.empty(min(step, count), dtype=torch.float32, device=dev)
        for lo, hi in slices(count, step):
            v = tmp[: hi - lo].copy_(codes[lo:hi])
            _block_sums(v.mul_(v), b, sums[lo // b :])
        wide = scale.double()
        return float(torch.dot(sums, wide.mul_(wide)))

    @kernel
    def check(
        self, meta: dict[str, Any], payload: Buffer, count: int, device: torch.device | str = "cpu"
    ) -> None:
        """Codes are bounded (|code| <= 128): finite scales that cannot overflow are all there is to check."""
        absmax, _ = self._unpack(meta, payload, count, torch.device(device))
        if self._may_overflow(absmax):
            super().check(meta, payload, count, device)


@functools.lru_cache(maxsize=64)
def _tables(levels: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(encode table, decode table) for a 16-level code on ``device``.

    Encode: cell i of [-1, 1] (centre (i - _CELLS) / _CELLS) -> index of the nearest level, so that finding a
    code is one multiply-add and one gather instead of a search. Decode: byte -> its two levels as one int64
    (two float32s), so that a byte decodes with one gather.
    """
    lv = torch.tensor(levels, dtype=torch.float64)
    centres = torch.arange(2 * _CELLS + 1, dtype=torch.float64) / _CELLS - 1.0
    encode = (centres[:, None] - lv[None, :]).abs().argmin(dim=1).to(torch.uint8)
    byte = torch.arange(256)
    pairs = torch.stack([lv[byte >> 4], lv[byte & 15]], dim=1).to(torch.float32).contiguous()
    return encode.to(device), pairs.view(torch.int64).view(-1).to(device)


def _add_rows(out: torch.Tensor, values: torch.Tensor, scales: torch.Tensor, width: int) -> None:
    """out += values * scale of its run, for consecutive runs of ``width`` (the last may be partial)."""
    full = values.numel() // width
    if full:
        out[: full * width].view(full, width).addcmul_(
            values[: full * width].view(full, width), scales[:full, None]
        )
    if values.numel() > full * width:
        out[full * width :].addcmul_(values[full * width :], scales[full : full + 1])


def _block_sums(v: torch.Tensor, width: int, out: torch.Tensor) -> None:
    """Add the sums of consecutive runs of ``width`` in v (the last may be partial) to out[0], out[1], ..."""
    full = v.numel() // width
    if full:
        out[:full] += v[: full * width].view(full, width).sum(dim=1)
    if v.numel() > full * width:
        out[full] += v[full * width :].sum()


@functools.lru_cache(maxsize=64)
def _square_tables(levels: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(byte -> level[hi]² + level[lo]², byte -> level[hi]²) in float32, from the float32 levels of decode."""
    sq = torch.tensor(levels, dtype=torch.float32).double().square()
    byte = torch.arange(256)
    both = (sq[byte >> 4] + sq[byte & 15]).to(torch.float32)
    return both.to(device), sq[byte >> 4].to(torch.float32).to(device)


def _group_rows(values: torch.Tensor) -> torch.Tensor:
    """Per-block values as (groups, GROUP) rows, a partial last group padded with its own last value."""
    pad = -values.numel() % GROUP
    if pad:
        values = torch.cat([values, values[-1:].expand(pad)])
    return values.view(-1, GROUP)


def _block_scales(codes: torch.Tensor, step: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """Block scales from their 8-bit codes, computed on (group, 256) rows like the encoder's."""
    q = torch.zeros(step.numel() * GROUP, dtype=torch.float32, device=codes.device)
    q[: codes.numel()] = codes
    return torch.addcmul(low[:, None], q.view(-1, GROUP), step[:, None]).view(-1)[: codes.numel()]


_CodeScratch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _code_rows(
    rows: torch.Tensor, scales: torch.Tensor, lut: torch.Tensor, scratch: _CodeScratch, packed: torch.Tensor
) -> None:
    """The 4-bit codes of float32 ``rows`` (one block each) against their decoded ``scales``, two to a byte,
    into ``packed`` (as many bytes as it holds); ``scratch``: float32 of rows' size, uint8 codes of it and
    two int16 halves of it."""
    tmp, codes, shifted, odd = scratch
    t = tmp[: rows.numel()].view_as(rows)
    torch.mul(rows, (_CELLS / scales.clamp_min(_TINY))[:, None], out=t)
    t.add_(_CELLS + 0.5).clamp_(0, 2 * _CELLS)
    cells = t.view(-1).view(torch.int32)
    cells.copy_(t.view(-1))  # in place, element by element: truncating a non-negative value
    if rows.device.type != "cpu":  # NaN (refused by a deferred check) must not index out of the table
        cells.clamp_(0, 2 * _CELLS)
    c = torch.index_select(lut, 0, cells, out=codes[: t.numel()])
    # two codes per byte, the even element's in the high nibble. As int16 a pair is even + 256 * odd
    # (little-endian), so (pair << 4) + (pair >> 8) has the packed byte as its low byte.
    m = packed.numel()
    pairs = c[: 2 * m].view(torch.int16)
    h = torch.bitwise_left_shift(pairs, 4, out=shifted[:m])
    h.add_(torch.bitwise_right_shift(pairs, 8, out=odd[:m]))
    packed.copy_(h)  # int16 -> uint8 keeps the low byte


class FourBit(Codec):
    """4-bit blockwise codes with double quantization; ``levels`` are the 16 values the codes stand for.

    Each block of ``block`` elements has a scale s ~ SHRINK * its absmax; the scales are coded in 8 bits each,
    linearly between the minimum and maximum of their group of 256 blocks. Elements are coded relative to the
    *decoded* scale, so the decoder's scale is exactly the one the codes were chosen for. Cost per element:
    4 + 8/block + 64/(256*block) bits, 4.129 at block 64.

    Error bound per element, with a the block's absmax and step its group's scale step (so that
    |s - SHRINK*a| <= step/2): max(F*s, a - s) <= F*(SHRINK*a + step/2) + (1 - SHRINK)*a + step/2, where
    F = ``max_error_factor(levels)`` (half the largest gap between levels plus the look-up table's cell) and
    a - s is the clipping of the largest elements.
    """

    levels: ClassVar[tuple[float, ...]]

    def __init__(self, block: int = 64) -> None:
        self.block = _check_block(self.name, block, 16, 4096)

    @property
    def alignment(self) -> int:
        return self.block * GROUP

    def config(self) -> dict[str, Any]:
        return {"block": self.block}

    def _sizes(self, count: int) -> tuple[int, int]:
        nblocks = -(-count // self.block)
        return nblocks, -(-nblocks // GROUP)

    def payload_nbytes(self, count: int) -> int:
        nblocks, ngroups = self._sizes(count)
        return 8 * ngroups + nblocks + -(-count // 2)

    def cut(self, payload: Buffer, count: int, a: int, b: int) -> Buffer:
        """Each section cut to the groups, blocks and bytes of a..b (``a`` starts a group, so a byte too)."""
        nblocks, ngroups = self._sizes(count)
        blocks = slice(a // self.block, -(-b // self.block))
        groups = slice(a // self.alignment, -(-b // self.alignment))
        codes = 8 * ngroups + nblocks
        return join(
            payload,
            [
                (4 * groups.start, 4 * groups.stop),
                (4 * (ngroups + groups.start), 4 * (ngroups + groups.stop)),
                (8 * ngroups + blocks.start, 8 * ngroups + blocks.stop),
                (codes + a // 2, codes + -(-b // 2)),
            ],
        )

    @kernel
    def encode_on_device(self, x: torch.Tensor) -> tuple[dict[str, Any], torch.Tensor]:
        x = self.check_input(x)
        n, b = x.numel(), self.block
        nblocks, ngroups = self._sizes(n)
        out = empty(self.payload_nbytes(n), torch.uint8, x.device)
        g_step = out[: 4 * ngroups].view(torch.float32)
        g_low = out[4 * ngroups : 8 * ngroups].view(torch.float32)
        s_codes = out[8 * ngroups : 8 * ngroups + nblocks]
        packed = out[8 * ngroups + nblocks :]
        lut, _ = _tables(self.levels, x.device)
        step = self.alignment * max(1, _STEP // self.alignment)
        size, copy = min(step, nblocks * b), _needs_copy(x, b)

        def scratch() -> _FourBitScratch:
            tmp = torch.empty(size, dtype=torch.float32, device=x.device)
            codes = torch.empty(size, dtype=torch.uint8, device=x.device)
            shifted, odd = torch.empty(2, size // 2, dtype=torch.int16, device=x.device)
            return tmp, codes, shifted, odd, torch.empty_like(tmp) if copy else None

        def encode_step(scr: _FourBitScratch, lo: int, hi: int) -> None:
            tmp, codes, shifted, odd, buf = scr
            rows = _fp32_rows(x, lo, hi, b, buf)
            t = tmp[: rows.numel()].view_as(rows)
            a = torch.abs(rows, out=t).amax(dim=1).mul_(SHRINK)
            b0, g0, ng = lo // b, lo // (b * GROUP), -(-len(a) // GROUP)
            s = self._quantize_scales(a, s_codes[b0 : b0 + len(a)], g_step[g0 : g0 + ng], g_low[g0 : g0 + ng])
            m = -(-(hi - lo) // 2)
            _code_rows(rows, s, lut, (t, codes, shifted, odd), packed[lo // 2 : lo // 2 + m])

        for_each_step(encode_step, scratch, n, step, x.device)
        return {}, out

    def _quantize_scales(
        self, target: torch.Tensor, codes: torch.Tensor, g_step: torch.Tensor, g_low: torch.Tensor
    ) -> torch.Tensor:
        """Write the 8-bit codes of the block scales and their groups' step and minimum; return the scales
        the decoder will compute from them (``_block_scales``' arithmetic on the same rows)."""
        q, step, low, scales = self._scale_rows(_group_rows(target))
        codes.copy_(q.view(-1)[: len(target)])
        g_step.copy_(step)
        g_low.copy_(low)
        return scales.view(-1)[: len(target)]

    def _scale_rows(
        self, rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(8-bit codes, step, minimum, decoded scales) of block-scale targets in (groups, GROUP) rows."""
        low, high = rows.amin(dim=1), rows.amax(dim=1)
        step = (high - low) / 255.0
        # NaN and Inf reach the group extremes: checked here, before any table index is built from them
        _check_finite(self.name, step)
        q = ((rows - low[:, None]) / step.clamp_min(_TINY)[:, None]).round_().clamp_(0, 255)
        return q, step, low, torch.addcmul(low[:, None], q, step[:, None])

    def _unpack(
        self, meta: dict[str, Any], payload: Buffer, count: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(float32 block scales, packed codes) of a checked payload, on ``device``."""
        self.check_payload(meta, payload, count)
        nblocks, ngroups = self._sizes(count)
        buf = as_uint8(payload, device)
        g_step = buf[: 4 * ngroups].view(torch.float32)
        g_low = buf[4 * ngroups : 8 * ngroups].view(torch.float32)
        _check_scales(self.name, buf[: 8 * ngroups].view(torch.float32))  # the steps and minima, adjacent
        scales = _block_scales(buf[8 * ngroups : 8 * ngroups + nblocks], g_step, g_low)
        return scales, buf[8 * ngroups + nblocks :]

    def _check_overflow(self, scales: torch.Tensor) -> None:
        """Levels lie in [-1, 1], so finite block scales are all the finiteness check there is to make."""
        if scales.numel():
            require(
                torch.isfinite(scales.amax()),
                lambda: CodecError(f"{self.name}: block scale overflows", reason="nonfinite"),
            )

    @kernel
    def decode(self, meta: dict[str, Any], payload: Buffer, count: int, device: torch.device) -> torch.Tensor:
        b = self.block
        scales, packed = self._unpack(meta, payload, count, device)
        nblocks = len(scales)
        _, table = _tables(self.levels, torch.device(device))
        out = empty(nblocks * b, torch.float32, device)
        step = b * max(1, _STEP // b)

        def scratch() -> torch.Tensor:
            return torch.empty(min(step, count) // 2 + 1, dtype=torch.int32, device=device)

        def decode_step(idx: torch.Tensor, lo: int, hi: int) -> None:
            i = idx[: -(-(hi - lo) // 2)]
            i.copy_(packed[lo // 2 : lo // 2 + len(i)])
            torch.index_select(table, 0, i, out=out[lo : lo + 2 * len(i)].view(torch.int64))
            rows = -(-(hi - lo) // b)
            out[lo : lo + rows * b].view(rows, b).mul_(scales[lo // b : lo // b + rows, None])

        for_each_step(decode_step, scratch, count, step, torch.device(device))
        return out[:count]

    @kernel
    def decode_add(
        self, meta: dict[str, Any], payload: Buffer, count: int, out: torch.Tensor, alpha: float
    ) -> None:
        """Levels gathered into a cache-sized scratch, then ``out += levels * (alpha * block scale)``."""
        check_out(self.name, out, count)
        b = self.block
        device = out.device
        scales, packed = self._unpack(meta, payload, count, device)
        self._check_overflow(scales)
        scales.mul_(alpha)
        _, table = _tables(self.levels, device)
        step = b * max(1, (_FOLD_STEP if device.type == "cpu" else _GPU_FOLD_STEP) // b)
        pairs = min(step, count) // 2 + 1

        def scratch() -> tuple[torch.Tensor, torch.Tensor]:
            idx = torch.empty(pairs, dtype=torch.int32, device=device)
            return idx, torch.empty(2 * pairs, dtype=torch.float32, device=device)

        def add_step(scr: tuple[torch.Tensor, torch.Tensor], lo: int, hi: int) -> None:
            idx, tmp = scr
            i = idx[: -(-(hi - lo) // 2)]
            i.copy_(packed[lo // 2 : lo // 2 + len(i)])
            torch.index_select(table, 0, i, out=tmp[: 2 * len(i)].view(torch.int64))
            _add_rows(out[lo:hi], tmp[: hi - lo], scales[lo // b :], b)

        for_each_step(add_step, scratch, count, step, device)

    @kernel
    def decode_add_rows(
        self,
        chunks: Sequence[tuple[dict[str, Any], Buffer]],
        count: int,
        out: torch.Tensor,
        alphas: list[float],
    ) -> bool:
        """``decode_add`` of K chunks of one size, their sections stacked as K rows: one check of the scales,
        one block-scale computation, one gather of the levels for them all, then each row added to ``out`` in
        turn with ``decode_add``'s own op (``_add_rows``). Chunks of one CPU fold step only (a larger chunk's
        decode is not overhead-bound, and K of them would not stay in cache)."""
        b, k = self.block, len(chunks)
        if out.device.type != "cpu" or count > _FOLD_STEP:
            return False
        rows = self.payload_rows(chunks, count, out)
        if rows is None:
            return False
        nblocks, ngroups = self._sizes(count)
        groups = rows[:, : 8 * ngroups].reshape(-1).view(torch.float32)  # each row: steps, then minima
        if groups.numel():
            low, high = torch.aminmax(groups)
            if not bool((low >= 0.0) & (high < math.inf)):
                return False
        groups = groups.view(k, 2, ngroups)
        q = torch.zeros(k, ngroups * GROUP, dtype=torch.float32)
        q[:, :nblocks] = rows[:, 8 * ngroups : 8 * ngroups + nblocks]
        scales = torch.addcmul(groups[:, 1, :, None], q.view(k, ngroups, GROUP), groups[:, 0, :, None])
        scales = scales.view(k, -1)[:, :nblocks]
        if scales.numel() and not bool(torch.isfinite(scales.amax())):
            return False
        scales = scales * torch.tensor(alphas, dtype=torch.float32)[:, None]
        _, table = _tables(self.levels, out.device)
        codes = rows[:, 8 * ngroups + nblocks :].to(torch.int32)
        levels = torch.index_select(table, 0, codes.view(-1)).view(torch.float32).view(k, -1)
        for values, row_scales in zip(levels, scales, strict=True):
            _add_rows(out, values[:count], row_scales, b)
        return True

    @kernel
    def sq_norm(
        self, meta: dict[str, Any], payload: Buffer, count: int, device: torch.device | str = "cpu"
    ) -> float:
        """Σ x² without decoding: Σ_blocks s² · Σ level², the level sums by one gather per packed byte.

        Codes are bounded (|level| <= 1), so NaN/Inf can only come from the block scales; a scale that
        overflows makes its s² (and the result) non-finite, as it makes the decoded values non-finite."""
        dev = torch.device(device)
        half = self.block // 2  # bytes per block
        scales, packed = self._unpack(meta, payload, count, dev)
        nblocks = len(scales)
        scales = scales.double()
        both, high = _square_tables(self.levels, dev)
        sums = torch.zeros(nblocks, dtype=torch.float64, device=dev)
        pairs = count // 2  # bytes with two elements; an odd count's last byte has one, in its high nibble
        step = half * max(1, _STEP // half)
        idx = torch.empty(min(step, pairs), dtype=torch.int32, device=dev)
        vals = torch.empty(min(step, pairs), dtype=torch.float32, device=dev)
        for lo, hi in slices(pairs, step):
            i = idx[: hi - lo].copy_(packed[lo:hi])
            _block_sums(torch.index_select(both, 0, i, out=vals[: hi - lo]), half, sums[lo // half :])
        if count % 2:
            sums[(count - 1) // self.block] += high[packed[pairs].long()].double()
        return float(torch.dot(sums, scales.mul_(scales)))

    @kernel
    def check(
        self, meta: dict[str, Any], payload: Buffer, count: int, device: torch.device | str = "cpu"
    ) -> None:
        """Levels lie in [-1, 1], so a payload decodes to finite values when its block scales are finite.
        A block scale grows with its 8-bit code (steps are checked non-negative), so min + 255 step bounds its
        group's: only where that bound comes near the float32 maximum are the scales themselves computed
        (measured on one thread, an nf4 chunk of 40 K elements, the aggregator's check on arrival: 90-155 us
        before, 23-32 us with the bound)."""
        dev = torch.device(device)
        self.check_payload(meta, payload, count)
        _, ngroups = self._sizes(count)
        # steps, then minima: only these bytes go to the check's device
        groups = as_uint8(span(payload, 0, 8 * ngroups), dev).view(torch.float32)
        _check_scales(self.name, groups)
        if ngroups and float(torch.add(groups[ngroups:], groups[:ngroups], alpha=255.0).amax()) < _SAFE_SCALE:
            return
        scales, _ = self._unpack(meta, payload, count, dev)
        self._check_overflow(scales)

    @kernel
    def check_rows(
        self, chunks: Sequence[tuple[dict[str, Any], Buffer, int]], device: torch.device | str = "cpu"
    ) -> bool:
        """``check``'s scale bound over every chunk's groups at once: their steps and minima non-negative and
        finite, and min + 255 step below the safe bound everywhere (else the caller checks each, which
        computes the scales of a chunk near the bound, as ``check`` does)."""
        try:
            for meta, payload, count in chunks:
                self.check_payload(meta, payload, count)
        except CodecError:
            return False
        views = host_views([p for _, p, _ in chunks], device)
        if views is None:
            return False
        ngroups = [self._sizes(count)[1] for _, _, count in chunks]
        steps = [view[: 4 * n] for view, n in zip(views, ngroups, strict=True)]
        lows = [view[4 * n : 8 * n] for view, n in zip(views, ngroups, strict=True)]
        groups = host_bytes(steps + lows).view(torch.float32)
        if not groups.numel():
            return True
        low, high = torch.aminmax(groups)
        half = groups.numel() // 2
        bound = torch.add(groups[half:], groups[:half], alpha=255.0).amax()
        return bool((low >= 0.0) & (high < math.inf)) and float(bound) < _SAFE_SCALE

    @property
    def batch_unit(self) -> int:
        return self.block

    @kernel
    def encode_batch(self, flat: torch.Tensor, layout: Layout) -> tuple[list[dict[str, Any]], torch.Tensor]:
        """All slices in one op sequence: every block's maximum, then every group's scales at once (each
        slice's groups are its own, padded as ``_group_rows`` pads them), then every element's code; each
        slice's payload is then cut from those arrays, the same bytes as its own encode."""
        x = self._check_flat(flat, layout)
        b, device = self.block, x.device
        at = _batch_blocks(layout, b, device)
        nbf = layout.total // b
        step = b * max(1, _BATCH_STEP // b)
        size = min(step, layout.total)
        maxima = torch.empty(nbf, dtype=torch.float32, device=device)

        def maximum_step(tmp: torch.Tensor, lo: int, hi: int) -> None:
            rows = x[lo:hi].view(-1, b)
            torch.amax(
                torch.abs(rows, out=tmp[: hi - lo].view_as(rows)), dim=1, out=maxima[lo // b : hi // b]
            )

        def max_scratch() -> torch.Tensor:
            return torch.empty(size, dtype=torch.float32, device=device)

        for_each_step(maximum_step, max_scratch, layout.total, step, device)
        q, g_step, g_low, decoded = self._scale_rows(maxima.mul_(SHRINK)[at.rows].view(-1, GROUP))
        s_codes = q.view(-1)[at.inverse].to(torch.uint8)
        scales = torch.zeros(nbf, dtype=torch.float32, device=device)
        scales[at.real] = decoded.view(-1)[at.inverse]
        packed = torch.empty(layout.total // 2, dtype=torch.uint8, device=device)
        lut, _ = _tables(self.levels, device)

        def code_scratch() -> _CodeScratch:
            shifted, odd = torch.empty(2, size // 2, dtype=torch.int16, device=device)
            return max_scratch(), torch.empty(size, dtype=torch.uint8, device=device), shifted, odd

        def code_step(scr: _CodeScratch, lo: int, hi: int) -> None:
            rows = x[lo:hi].view(-1, b)
            _code_rows(rows, scales[lo // b : hi // b], lut, scr, packed[lo // 2 : hi // 2])

        for_each_step(code_step, code_scratch, layout.total, step, device)
        pieces = []
        for start, n, (g0, ng), (r0, nb) in zip(
            layout.starts, layout.counts, at.groups, at.blocks, strict=True
        ):
            pieces += [
                g_step[g0 : g0 + ng].view(torch.uint8),
                g_low[g0 : g0 + ng].view(torch.uint8),
                s_codes[r0 : r0 + nb],
                packed[start // 2 : start // 2 + -(-n // 2)],
            ]
        return [{} for _ in layout.counts], torch.cat(pieces)

    @kernel
    def decode_batch(
        self, metas: list[dict[str, Any]], blob: torch.Tensor, layout: Layout, out: torch.Tensor
    ) -> None:
        b, device = self.block, out.device
        scales, packed = self._unpack_batch(metas, blob, layout, out)
        _, table = _tables(self.levels, device)
        step = b * max(1, _STEP // b)

        def scratch() -> torch.Tensor:
            return torch.empty(min(step, layout.total) // 2, dtype=torch.int32, device=device)

        def decode_step(idx: torch.Tensor, lo: int, hi: int) -> None:
            i = idx[: (hi - lo) // 2].copy_(packed[lo // 2 : hi // 2])
            torch.index_select(table, 0, i, out=out[lo:hi].view(torch.int64))
            out[lo:hi].view(-1, b).mul_(scales[lo // b : hi // b, None])

        for_each_step(decode_step, scratch, layout.total, step, device)

    @kernel
    def decode_add_batch(
        self, metas: list[dict[str, Any]], blob: torch.Tensor, layout: Layout, out: torch.Tensor, alpha: float
    ) -> None:
        b, device = self.block, out.device
        scales, packed = self._unpack_batch(metas, blob, layout, out)
        self._check_overflow(scales)
        scales.mul_(alpha)
        _, table = _tables(self.levels, device)
        step = b * max(1, (_FOLD_STEP if device.type == "cpu" else _GPU_FOLD_STEP) // b)

        def scratch() -> tuple[torch.Tensor, torch.Tensor]:
            size = min(step, layout.total)
            idx = torch.empty(size // 2, dtype=torch.int32, device=device)
            return idx, torch.empty(size, dtype=torch.float32, device=device)

        def add_step(scr: tuple[torch.Tensor, torch.Tensor], lo: int, hi: int) -> None:
            idx, tmp = scr
            i = idx[: (hi - lo) // 2].copy_(packed[lo // 2 : hi // 2])
            torch.index_select(table, 0, i, out=tmp[: hi - lo].view(torch.int64))
            _add_rows(out[lo:hi], tmp[: hi - lo], scales[lo // b :], b)

        for_each_step(add_step, scratch, layout.total, step, device)

    def _check_flat(self, flat: torch.Tensor, layout: Layout) -> torch.Tensor:
        x = self.check_input(flat)
        if x.dtype != torch.float32 or x.numel() != layout.total or layout.unit % self.block:
            raise CodecError(
                f"{self.name}: a batch needs float32 slices at multiples of {self.block}, got "
                f"{_describe_flat(x)} for {layout}"
            )
        return x

    def _unpack_batch(
        self, metas: list[dict[str, Any]], blob: torch.Tensor, layout: Layout, out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(float32 scale of every block of the flat buffer, zero in the padding; packed codes of every
        element, the padding's those of zero) of checked payloads, on out's device."""
        self._check_flat(out, layout)
        self.check_batch(metas, blob, layout)
        b, device = self.block, out.device
        blob = blob.to(device)
        at = _batch_blocks(layout, b, device)
        pad = _zero_codes(self.levels, device)
        steps, lows, s_codes, packed = [], [], [], []
        for (lo, hi), (_, ng), (_, nb), width in zip(
            payload_spans([self.payload_nbytes(n) for n in layout.counts]),
            at.groups,
            at.blocks,
            (layout.padded(i) // 2 for i in range(len(layout.counts))),
            strict=True,
        ):
            codes = lo + 8 * ng + nb
            steps.append(blob[lo : lo + 4 * ng])
            lows.append(blob[lo + 4 * ng : lo + 8 * ng])
            s_codes.append(blob[lo + 8 * ng : codes])
            packed += [blob[codes:hi], pad.expand(width - (hi - codes))]
        groups = torch.cat(steps + lows).view(torch.float32)  # steps, then minima
        _check_scales(self.name, groups)
        ng = at.ngroups
        q = torch.zeros(ng * GROUP, dtype=torch.float32, device=device)
        q[at.inverse] = torch.cat(s_codes).to(torch.float32)
        decoded = torch.addcmul(groups[ng:, None], q.view(-1, GROUP), groups[:ng, None]).view(-1)
        scales = torch.zeros(layout.total // b, dtype=torch.float32, device=device)
        scales[at.real] = decoded[at.inverse]
        return scales, torch.cat(packed)


@dataclass(frozen=True)
class _Blocks:
    """Where a layout's blocks lie, for a batch: the flat block index of each slice's blocks (``real``, slice
    after slice), the gather of their targets into (group, GROUP) rows with each slice's last block repeated
    as ``_group_rows`` pads (``rows``), the place of each block in those rows (``inverse``), and per slice
    (first of ``real``, blocks) and (first group, groups)."""

    real: torch.Tensor
    rows: torch.Tensor
    inverse: torch.Tensor
    blocks: tuple[tuple[int, int], ...]
    groups: tuple[tuple[int, int], ...]
    ngroups: int


@functools.lru_cache(maxsize=64)
def _batch_blocks(layout: Layout, block: int, device: torch.device) -> _Blocks:
    """The block indices of ``layout`` (a sender's layout is the same every round: computed once)."""
    real: list[int] = []
    rows: list[int] = []
    inverse: list[int] = []
    blocks, groups = [], []
    g0 = 0
    for start, n in zip(layout.starts, layout.counts, strict=True):
        nb = -(-n // block)
        ng = -(-nb // GROUP)
        first = start // block
        blocks.append((len(real), nb))
        groups.append((g0, ng))
        real += range(first, first + nb)
        rows += [*range(first, first + nb), *[first + nb - 1] * (ng * GROUP - nb)]
        inverse += range(g0 * GROUP, g0 * GROUP + nb)
        g0 += ng

    def index(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=device)

    return _Blocks(index(real), index(rows), index(inverse), tuple(blocks), tuple(groups), g0)


@functools.lru_cache(maxsize=64)
def _zero_codes(levels: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """One byte holding the code of 0 twice (what the encoder writes for zero padding), to expand."""
    lut, _ = _tables(levels, device)
    code = int(lut[_CELLS])
    return torch.tensor([code * 17], dtype=torch.uint8, device=device)


def _describe_flat(x: torch.Tensor) -> str:
    return f"{x.dtype} tensor of {x.numel()} elements"


_FourBitScratch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]


def _normal_float_levels() -> tuple[float, ...]:
    """NF4 (Dettmers et al., QLoRA 2023): quantiles of N(0, 1), 8 positive and 7 negative levels plus an
    exact zero, normalised to [-1, 1]; the outermost quantile is at 1 - (1/30 + 1/32)/2, so it is finite."""
    edge = 1.0 - (1.0 / 30 + 1.0 / 32) / 2
    pos = torch.special.ndtri(torch.linspace(0.5, edge, 9, dtype=torch.float64)[1:])
    neg = -torch.special.ndtri(torch.linspace(0.5, edge, 8, dtype=torch.float64)[1:])
    lv = torch.cat([neg.flip(0), torch.zeros(1, dtype=torch.float64), pos]) / pos.max()
    return tuple(float(v) for v in lv)


def _e2m1_levels() -> tuple[float, ...]:
    """FP4 E2M1 (sign, 2 exponent bits, 1 mantissa bit; the OCP microscaling element type) divided by its
    maximum 6: code c is (-1)**(c >> 3) * (0, 0.5, 1, 1.5, 2, 3, 4, 6)[c & 7] / 6."""
    mags = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
    return tuple((-1.0 if c >> 3 else 1.0) * mags[c & 7] / 6.0 for c in range(16))


class Nf4(FourBit):
    name = "nf4"
    levels = _normal_float_levels()


class Fp4(FourBit):
    name = "fp4"
    levels = _e2m1_levels()


def max_error_factor(levels: tuple[float, ...]) -> float:
    """Half the largest gap between adjacent levels plus the look-up table's cell: the per-element error bound
    of a 4-bit code in units of its block scale."""
    lv = sorted(set(levels))
    return max(b - a for a, b in itertools.pairwise(lv)) / 2 + 1.0 / _CELLS


__all__ = ["GROUP", "FourBit", "Fp4", "Int8", "Nf4", "max_error_factor"]

"""Error feedback: summed sent updates stay within one residual of summed true updates; without it, drift."""

from __future__ import annotations

import os

import pytest
import torch

from fedq.codecs import EncodedErrorFeedback, ErrorFeedback, get_codec
from fedq.codecs.feedback import SLAB_BYTES, _Slabs
from fedq.errors import CodecError

CPU = torch.device("cpu")


def _rounds(codec_name: str, feedback: ErrorFeedback | None, rounds: int, n: int = 1 << 14) -> list[float]:
    """Gap |sum(true) - sum(decoded)| after each round, in units of one round's quantization error."""
    codec = get_codec(codec_name)
    g = torch.Generator().manual_seed(0)
    true, sent, gaps = torch.zeros(n), torch.zeros(n), []
    one_residual = 0.0
    for _ in range(rounds):
        x = torch.randn(n, generator=g) * 0.02
        y = feedback.compensate("w", x) if feedback else x
        meta, payload = codec.encode(y)
        decoded = codec.decode(meta, payload, n, CPU)
        if feedback:
            feedback.update("w", y, decoded)
        true += x
        sent += decoded
        one_residual = float((y - decoded).norm())
        gaps.append(float((true - sent).norm()) / one_residual)
    return gaps


@pytest.mark.parametrize("codec", ["nf4", "int8"])
def test_feedback_keeps_the_gap_at_one_residual(codec: str) -> None:
    with_fp32 = _rounds(codec, ErrorFeedback(), 30)
    with_bf16 = _rounds(codec, ErrorFeedback(torch.bfloat16), 30)
    without = _rounds(codec, None, 30)
    assert max(with_fp32) == pytest.approx(1.0, abs=1e-3)  # telescoping: the gap *is* the last residual
    assert max(with_bf16) < 1.05  # bf16 storage adds its rounding of each residual, ~1% here
    assert without[-1] > 4.0  # independent errors add up like sqrt(rounds): sqrt(30) = 5.5


def test_per_chunk_use_equals_whole_tensor_use() -> None:
    """A streaming sender compensates and updates chunk by chunk, keyed by element offset."""
    codec = get_codec("int8", block=64)
    g = torch.Generator().manual_seed(3)
    whole, chunked = ErrorFeedback(), ErrorFeedback()
    bounds = [(0, 128), (128, 320), (320, 1000)]
    for _ in range(3):
        x = torch.randn(1000, generator=g)
        y = whole.compensate("w", x)
        m, p = codec.encode(y)
        decoded = codec.decode(m, p, 1000, CPU)
        whole.update("w", y, decoded)
        parts = []
        for lo, hi in bounds:
            yc = chunked.compensate("w", x[lo:hi], lo)
            m, p = codec.encode(yc)
            dc = codec.decode(m, p, hi - lo, CPU)
            chunked.update("w", yc, dc, lo)
            parts.append(dc)
        assert torch.equal(torch.cat(parts), decoded)
    assert whole.nbytes == chunked.nbytes == 4 * 1000


def test_memory_cost_per_parameter() -> None:
    for dtype, per_param in [(torch.float32, 4), (torch.bfloat16, 2)]:
        fb = ErrorFeedback(dtype)
        fb.update("a", torch.ones(300), torch.zeros(300))
        fb.update("b", torch.ones(100), torch.zeros(100), offset=4096)
        assert fb.nbytes == per_param * 400
        assert torch.equal(fb.compensate("a", torch.zeros(300)), torch.ones(300))


def test_encoded_residuals_of_cpu_tensors_keep_their_places_on_disk() -> None:
    """A CPU tensor's encoded residuals are in the feedback's file, not in memory: one place per chunk, reused
    when the chunk's residual is encoded again; what is read back is what was encoded."""
    fb = EncodedErrorFeedback()
    g = torch.Generator().manual_seed(0)
    sizes = [1000, 77, 4096, 130]
    places = []
    for r in range(2):
        for i, n in enumerate(sizes):
            x = torch.randn(n, generator=g)
            y = fb.compensate("w", x, offset=i << 20)
            fb.update("w", y, torch.zeros(n), offset=i << 20)
            meta, place, count = fb._encoded[("w", i << 20)]
            meta_again, expected = fb.codec.encode_on_device(y.reshape(-1))
            assert count == n and meta == meta_again and torch.equal(place.load(), expected)
            if r == 0:
                places.append(place)
            else:
                assert place is places[i]
    assert fb.nbytes == sum(p.nbytes for p in places) == os.fstat(fb._file._file.fileno()).st_size
    fb.close()


def test_slabs_give_aligned_places_in_one_buffer() -> None:
    """A device's encoded residuals are copied into places carved from one slab (no long-lived block of
    their own among a send's transient ones), aligned for float32."""
    slabs = _Slabs()
    places = [slabs.take(n, CPU) for n in [1000, 77, 4096, 130]]
    starts = [p.data_ptr() for p in places]
    assert [p.numel() for p in places] == [1000, 77, 4096, 130]
    assert all(a % 64 == 0 for a in starts)
    assert max(starts) - min(starts) < SLAB_BYTES
    assert len({p.untyped_storage().data_ptr() for p in places}) == 1


def test_changed_chunking_is_an_error_not_a_silent_mismatch() -> None:
    fb = ErrorFeedback()
    fb.update("w", torch.ones(10), torch.zeros(10))
    with pytest.raises(CodecError, match="chunking"):
        fb.compensate("w", torch.zeros(12))


def test_only_float32_or_bfloat16_storage() -> None:
    with pytest.raises(CodecError):
        ErrorFeedback(torch.float16)

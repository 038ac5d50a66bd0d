"""A codec's output does not depend on how many threads ran it: payloads and decoded values are bit-identical
at 1, 2 and 4 torch threads, over tensors of several cache-sized steps with a partial last block."""

from __future__ import annotations

import pytest
import torch

from fedq.codecs import get_codec

COUNT = 3 * (1 << 20) + 4097  # several steps, the last one partial, an odd count


def _at(threads: int, codec_name: str, x: torch.Tensor) -> tuple[bytes, torch.Tensor, torch.Tensor, float]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        codec = get_codec(codec_name)
        meta, payload = codec.encode(x)
        decoded = codec.decode(meta, payload, x.numel(), torch.device("cpu"))
        total = torch.ones(x.numel())
        codec.decode_add(meta, payload, x.numel(), total, 0.5)
        norm = codec.sq_norm(meta, payload, x.numel())
        assert torch.get_num_threads() == threads  # the codec gave the caller's setting back
        return bytes(payload), decoded, total, norm
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("codec_name", ["int8", "nf4", "fp4", "fp16", "bf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_results_are_bit_identical_across_thread_counts(codec_name: str, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(COUNT, generator=g) * 0.02).to(dtype)
    one = _at(1, codec_name, x)
    for threads in (2, 4):
        other = _at(threads, codec_name, x)
        assert other[0] == one[0]
        assert torch.equal(other[1], one[1])
        assert torch.equal(other[2], one[2])
        assert other[3] == one[3]

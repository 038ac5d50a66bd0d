"""Small tensors encoded together (``fedq.codecs.batch``) must give exactly the bytes, values and residuals
of one encode per tensor: the receiver and the error feedback of the next round cannot tell the difference."""

from __future__ import annotations

from pathlib import Path

import hypothesis
import hypothesis.strategies as st
import torch

from fedq import wire
from fedq.client import codec_policy
from fedq.codecs import EncodedErrorFeedback, ErrorFeedback, get_codec
from fedq.codecs.base import Codec, own_bytes
from fedq.codecs.batch import Layout, flat_buffer, payload_spans
from fedq.safetensors import SafetensorsReader, save_file
from fedq.streaming import iter_container, plan

torch.set_num_threads(1)

CODECS = [
    get_codec("nf4"),
    get_codec("fp4"),
    get_codec("nf4", block=16),
    get_codec("fp4", block=128),
    get_codec("int8"),
    get_codec("int8", block=64),
    get_codec("fp32"),
    get_codec("fp16"),
    get_codec("bf16"),
]
COUNTS = st.lists(
    st.one_of(st.integers(0, 300), st.integers(1000, 40000), st.sampled_from([64, 16384, 16385, 65536])),
    min_size=1,
    max_size=8,
)


def _values(counts: list[int], seed: int, scale: float) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(counts):
        x = torch.randn(n, generator=g) * scale
        if i % 3 == 1:
            x[: n // 2] = 0.0  # whole zero blocks and groups
        out.append(x)
    return out


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(
    counts=COUNTS,
    codec=st.sampled_from(CODECS),
    extra_unit=st.sampled_from([1, 64, 4096]),
    scale=st.sampled_from([1e-3, 1.0, 1e30]),
    seed=st.integers(0, 2**16),
)
def test_a_batch_is_each_slice_encoded_alone(
    counts: list[int], codec: Codec, extra_unit: int, scale: float, seed: int
) -> None:
    """encode_batch gives each slice's payload bytes; decode_batch and decode_add_batch each slice's values,
    zero (or untouched) between the slices."""
    layout = Layout(tuple(counts), max(codec.batch_unit, extra_unit))
    xs = _values(counts, seed, scale)
    flat = flat_buffer(layout, torch.device("cpu"))
    for view, x in zip(layout.views(flat), xs, strict=True):
        view.copy_(x)
    metas, blob = codec.encode_batch(flat, layout)
    spans = payload_spans([codec.payload_nbytes(n) for n in counts])
    assert blob.numel() == spans[-1][1]
    alone = [codec.encode_on_device(x) for x in xs]
    for (meta, payload), got, (lo, hi) in zip(alone, metas, spans, strict=True):
        assert got == meta
        assert torch.equal(blob[lo:hi], payload)

    between = torch.ones(layout.total, dtype=torch.bool)
    for start, n in zip(layout.starts, counts, strict=True):
        between[start : start + n] = False
    decoded = torch.full((layout.total,), 7.0)
    codec.decode_batch(metas, blob, layout, decoded)
    assert not decoded[between].any()
    base = torch.randn(layout.total, generator=torch.Generator().manual_seed(seed))
    summed = base.clone()
    codec.decode_add_batch(metas, blob, layout, summed, 0.5)
    assert torch.equal(summed[between], base[between])
    cpu = torch.device("cpu")
    for (meta, payload), x, d, s, b in zip(
        alone, xs, layout.views(decoded), layout.views(summed), layout.views(base), strict=True
    ):
        assert torch.equal(d, codec.decode(meta, payload, x.numel(), cpu))
        expected = b.clone()
        codec.decode_add(meta, own_bytes(payload), x.numel(), expected, 0.5)
        assert torch.equal(s, expected)


FEEDBACK = ["none", "fp32", "bf16", "encoded"]


def _feedback(kind: str) -> ErrorFeedback | None:
    if kind == "none":
        return None
    if kind == "encoded":
        return EncodedErrorFeedback()
    return ErrorFeedback(torch.float32 if kind == "fp32" else torch.bfloat16)


def _one_chunk_at_a_time(
    tensors: dict[str, torch.Tensor],
    stream: str,
    codec: str,
    chunk_bytes: int,
    feedback: ErrorFeedback | None,
) -> list[bytes]:
    """The chunk messages of a container encoded one chunk at a time through the per-slice APIs (what every
    chunk went through before batches): compensate, encode, decode, update, frame."""
    manifest, codecs = plan(
        tensors, stream=stream, meta={}, codec_for=codec_policy(codec), chunk_bytes=chunk_bytes
    )
    out = []
    for entry in manifest.tensors:
        flat = tensors[entry.name].reshape(-1)
        c = codecs[entry.name]
        for index in range(entry.first, entry.first + entry.chunks):
            offset, count = entry.slice_of(index)
            piece = flat[offset : offset + count]
            if feedback is not None:
                piece = feedback.compensate(entry.name, piece, offset)
            meta, payload = c.encode_on_device(piece)
            raw = bytes(payload.numpy().data)
            if feedback is not None:
                feedback.update(entry.name, piece, c.decode(meta, payload, count, piece.device), offset)
            out.append(
                wire.frame_chunk(
                    stream=stream,
                    index=index,
                    name=entry.name,
                    dtype=entry.dtype,
                    shape=entry.shape,
                    offset=offset,
                    count=count,
                    codec=c,
                    codec_meta=meta,
                    raw=raw,
                )
            )
    return out


SHAPES = st.lists(
    st.one_of(
        st.tuples(st.integers(1, 300)),
        st.tuples(st.integers(1, 80), st.integers(1, 200)),
        st.tuples(st.sampled_from([64, 256]), st.sampled_from([64, 130, 256])),
    ),
    min_size=1,
    max_size=10,
)


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(
    shapes=SHAPES,
    dtypes=st.lists(
        st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), min_size=10, max_size=10
    ),
    codec=st.sampled_from(["nf4", "fp4", "int8", "fp16", "bf16", "fp32"]),
    feedback=st.sampled_from(FEEDBACK),
    chunk_bytes=st.sampled_from([4 << 10, 64 << 10, 4 << 20]),
    rounds=st.lists(st.integers(1, 2**10 - 1), min_size=3, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_a_container_of_small_tensors_is_the_same_bytes_as_one_chunk_at_a_time(
    shapes: list[tuple[int, ...]],
    dtypes: list[torch.dtype],
    codec: str,
    feedback: str,
    chunk_bytes: int,
    rounds: list[int],
    seed: int,
) -> None:
    """Over three rounds of random small-tensor sets (each round a random subset, so that some tensors have
    a residual and others not): the batched sender's chunk messages are the per-chunk sender's, byte for
    byte, error feedback included; tensors larger than a chunk travel as before."""
    g = torch.Generator().manual_seed(seed)
    tensors = {
        f"t{i}": (torch.randn(shape, generator=g) * 1e-2).to(dtype)
        for i, (shape, dtype) in enumerate(zip(shapes, dtypes, strict=False))
    }
    batched_fb, alone_fb = _feedback(feedback), _feedback(feedback)
    for r, subset in enumerate(rounds):
        chosen = {n: t for i, (n, t) in enumerate(tensors.items()) if subset >> i & 1} or tensors
        stream = f"s{r}"
        bodies = list(
            iter_container(
                chosen,
                stream=stream,
                meta={},
                codec_for=codec_policy(codec),
                chunk_bytes=chunk_bytes,
                feedback=batched_fb,
            )
        )
        chunks = [body for body in bodies if wire.decode(body).kind == wire.CHUNK]
        assert chunks == _one_chunk_at_a_time(chosen, stream, codec, chunk_bytes, alone_fb)
        for t in tensors.values():
            t.add_(torch.randn(t.shape, generator=g).to(t.dtype) * 1e-3)


def test_small_tensors_read_from_a_file_are_the_same_bytes(tmp_path: Path) -> None:
    """A file's slices come in buffers reused a few slices later: a group copies each as it comes, so a
    file of many small tensors sends what the tensors in memory send."""
    g = torch.Generator().manual_seed(3)
    tensors = {f"t{i}": torch.randn(40 + i, 64, generator=g) for i in range(12)} | {"v": torch.randn(64)}
    path = save_file(tensors, tmp_path / "m.safetensors")
    options = {"stream": "s", "meta": {}, "codec_for": codec_policy("nf4"), "chunk_bytes": 64 << 10}
    with SafetensorsReader(path) as reader:
        from_file = list(iter_container(reader, **options))  # type: ignore[arg-type]
    assert from_file == list(iter_container(tensors, **options))  # type: ignore[arg-type]

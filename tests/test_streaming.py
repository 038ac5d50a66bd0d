"""Container streams: lazy chunking, reassembly under duplication and reordering, files, the real broker."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
import torch

from fedq import streaming, wire
from fedq.codecs import CODECS, ErrorFeedback, get_codec
from fedq.errors import ConfigError, StreamError
from fedq.safetensors import SafetensorsReader, save_file
from fedq.topology import Names
from fedq.transport import connect
from fedq.transport.base import REASON_HEADER
from fedq.transport.memory import MemoryTransport
from fedq.units import parse_size


def _state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(300, 40, generator=gen) * 0.02,
        "block.weight": torch.randn(5000, generator=gen).half(),
        "block.bias": torch.randn(17, generator=gen).bfloat16(),
        "norm.scale": torch.tensor(1.25),
        "empty": torch.zeros(0, 8),
    }


class _Counting(Mapping[str, torch.Tensor]):
    """Counts which tensors' data the sender asks for, to prove it reads lazily."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors
        self.reads: list[str] = []

    def __getitem__(self, name: str) -> torch.Tensor:
        self.reads.append(name)
        return self.tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def items(self):  # shapes only: plan() must not count as reading
        return self.tensors.items()


def _expected(tensors: Mapping[str, torch.Tensor], codec: str, chunk_bytes: int) -> dict[str, torch.Tensor]:
    """The codec's own round trip, slice by slice as the chunker cuts, in each tensor's own dtype."""
    c = get_codec(codec)
    per_chunk = streaming.chunk_elements_for(c, chunk_bytes)
    out = {}
    for name, t in tensors.items():
        flat = t.reshape(-1)
        parts = [flat[lo : lo + per_chunk] for lo in range(0, flat.numel(), per_chunk)]
        decoded = [c.decode(*c.encode(p), p.numel(), torch.device("cpu")) for p in parts]
        out[name] = (torch.cat(decoded) if decoded else torch.zeros(0)).to(t.dtype).view(t.shape)
    return out


def _assemble(messages: list[bytes]) -> tuple[streaming.Assembler, dict[str, torch.Tensor]]:
    assembler = streaming.Assembler()
    out: dict[str, torch.Tensor] = {}
    for body in messages:
        for chunk in assembler.add(wire.decode(body)):
            key = chunk.entry.name if chunk.stream == "s" else f"{chunk.stream}/{chunk.entry.name}"
            flat = out.setdefault(key, torch.full((chunk.entry.numel,), float("nan")))
            assert torch.isnan(flat[chunk.offset : chunk.offset + chunk.count]).all()  # each chunk once
            flat[chunk.offset : chunk.offset + chunk.count] = chunk.values()
    return assembler, out


def test_sender_is_lazy_and_chunks_are_bounded() -> None:
    tensors = _Counting(_state_dict())
    messages = streaming.iter_container(tensors, stream="s", meta={"client": "a"}, chunk_bytes=4096)
    manifest = wire.decode(next(messages))
    assert manifest.kind == "manifest" and tensors.reads == []
    first = wire.decode(next(messages))
    assert (first.name, first.offset, first.count) == ("embed.weight", 0, 1024) and tensors.reads == [
        "embed.weight"
    ]
    rest = [wire.decode(m) for m in messages]
    assert len(tensors.reads) == len(tensors)
    chunks = [first, *rest[:-1]]
    assert [c.index for c in chunks] == list(range(manifest.meta["chunks"])) == list(range(len(chunks)))
    assert max(c.payload.nbytes for c in chunks) <= 4096
    assert rest[-1].kind == "commit" and rest[-1].meta == {"chunks": len(chunks)}
    # fp32 codec: 1024 elements per 4096-byte chunk; 12000 and 5000 elements, then three single-chunk tensors
    assert [t[4] for t in manifest.meta["tensors"]] == [12, 5, 1, 1, 1]
    assert manifest.meta["client"] == "a"


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_chunk_counts_are_multiples_of_the_alignment(codec: str) -> None:
    c = get_codec(codec)
    tail = c.alignment // 2  # a last chunk shorter than the alignment (none when the alignment is 1)
    x = {"w": torch.randn(3 * c.alignment + tail)}
    chunk_bytes = c.payload_nbytes(c.alignment)  # one alignment unit per chunk
    msgs = [
        wire.decode(m)
        for m in streaming.iter_container(
            x, stream="s", meta={}, codec_for=lambda n, t: c, chunk_bytes=chunk_bytes
        )
    ]
    counts = [m.count for m in msgs if m.kind == "chunk"]
    assert counts == [c.alignment] * 3 + ([tail] if tail else [])


@pytest.mark.parametrize("codec", ["fp32", "fp16", "bf16"])
def test_shuffled_duplicated_early_chunks_reassemble(codec: str) -> None:
    tensors = _state_dict()
    c = get_codec(codec)
    messages = list(
        streaming.iter_container(tensors, stream="s", meta={}, codec_for=lambda n, t: c, chunk_bytes=2048)
    )
    shuffled = messages + messages[1:8] + [messages[0]]
    random.Random(7).shuffle(shuffled)
    assert wire.decode(shuffled[0]).kind != "manifest"  # chunks before the manifest are part of the test
    assembler, out = _assemble(shuffled)
    assert assembler.complete("s")
    expected = _expected(tensors, codec, 2048)
    for name, t in tensors.items():
        assert torch.equal(out[name].to(t.dtype).view(t.shape), expected[name])


def test_incomplete_until_every_part_is_there() -> None:
    messages = list(streaming.iter_container(_state_dict(), stream="s", meta={}, chunk_bytes=4096))
    assembler, _ = _assemble(messages[:-1])
    assert not assembler.complete("s")  # no commit
    assembler, _ = _assemble(messages[:3] + messages[4:])
    assert not assembler.complete("s")  # a chunk missing
    assembler, _ = _assemble(messages[1:])
    assert not assembler.complete("s")  # no manifest
    with pytest.raises(StreamError) as info:
        assembler.check_timeouts(0.0)
    assert info.value.reason == "timeout"


def test_interleaved_streams() -> None:
    a = list(streaming.iter_container(_state_dict(1), stream="a", meta={}, chunk_bytes=4096))
    b = list(streaming.iter_container(_state_dict(2), stream="b", meta={}, chunk_bytes=4096))
    mixed = [m for pair in zip(a, b, strict=False) for m in pair] + a[len(b) :] + b[len(a) :]
    assembler, _ = _assemble(mixed)
    assert assembler.complete("a") and assembler.complete("b")


def _reason(messages: list[bytes]) -> str:
    with pytest.raises(StreamError) as info:
        _assemble(messages)
    return info.value.reason


def test_inconsistent_streams_raise() -> None:
    tensors = _state_dict()
    messages = list(streaming.iter_container(tensors, stream="s", meta={}, chunk_bytes=4096))
    n = wire.decode(messages[-1]).meta["chunks"]
    extra = wire.encode_chunk(
        stream="s",
        index=n,
        name="norm.scale",
        dtype=torch.float32,
        shape=(),
        offset=0,
        count=1,
        codec=get_codec("fp32"),
        x=torch.ones(1),
    )
    assert _reason([*messages, extra]) == "too_many_chunks"
    renamed = wire.encode_chunk(
        stream="s",
        index=0,
        name="other",
        dtype=torch.float32,
        shape=(300, 40),
        offset=0,
        count=1024,
        codec=get_codec("fp32"),
        x=torch.ones(1024),
    )
    assert _reason([messages[0], renamed]) == "chunk_mismatch"
    assert _reason([messages[0], wire.encode_control("commit", "s", {"chunks": n + 1})]) == "commit_mismatch"
    other = streaming.iter_container(_state_dict(), stream="s", meta={"x": 1}, chunk_bytes=4096)
    assert _reason([messages[0], next(other)]) == "manifest_mismatch"
    lying = wire.encode_control(
        "manifest", "s", {"tensors": [["a", "float32", [10], "fp32", 2, 4]], "chunks": 2}
    )
    assert _reason([lying]) == "bad_manifest"  # 10 elements in chunks of 4 take 3 chunks
    with pytest.raises(StreamError):
        next(streaming.iter_container(tensors, stream="s", meta={"chunks": 3}))


def test_shard_of_is_deterministic_and_balanced() -> None:
    sizes = {"a": 10, "b": 10, "c": 5, "d": 3, "e": 20, "f": 2}
    # e=20 -> 0; a -> 1; b -> 1 (10 < 20); c ties 20/20 -> 0; d -> 1 (20 < 25); f -> 1 (23 < 25): 25 and 25
    assert streaming.shard_of(sizes, 2) == {"e": 0, "a": 1, "b": 1, "c": 0, "d": 1, "f": 1}
    assert streaming.shard_of(dict(reversed(sizes.items())), 2) == streaming.shard_of(sizes, 2)
    gen = random.Random(3)
    many = {f"t{i}": gen.randrange(1, 10**6) for i in range(200)}
    shards = streaming.shard_of(many, 4)
    loads = [sum(s for n, s in many.items() if shards[n] == i) for i in range(4)]
    assert max(loads) - min(loads) <= max(many.values())
    assert streaming.shard_of(many, 1) == dict.fromkeys(many, 0)


def test_sizes_and_flow() -> None:
    assert parse_size("512MiB") == 512 << 20
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("1.5GiB") == 3 << 29
    assert parse_size("67108864") == 64 << 20
    with pytest.raises(ConfigError):
        parse_size("lots")
    flow = streaming.flow_for_budget(None, 4 << 20)
    assert (flow.window_messages, flow.window_bytes, flow.prefetch) == (16, 64 << 20, 16)
    from fedq.metrics import current_rss_bytes

    budget = current_rss_bytes() + (256 << 20)
    flow = streaming.flow_for_budget(budget, 4 << 20)
    assert flow.window_bytes <= 64 << 20 and flow.window_messages == flow.prefetch >= 14
    with pytest.raises(StreamError):
        streaming.flow_for_budget(current_rss_bytes(), 4 << 20)


def test_receiver_times_out_on_an_incomplete_stream() -> None:
    transport = MemoryTransport()
    names = Names("unit")
    transport.declare(names, 1)
    messages = list(streaming.iter_container(_state_dict(), stream="s", meta={}, chunk_bytes=4096))
    for body in messages[:-1]:  # no commit
        transport.publish(names.updates_exchange, names.shard_key(0), body)
    with pytest.raises(StreamError) as info:
        streaming.receive_container(transport, names.updates_queue(0), "s", timeout=0.5)
    assert info.value.reason == "timeout"


# Against the real broker ------------------------------------------------------------------------------------


@pytest.mark.broker
@pytest.mark.parametrize("codec", sorted(CODECS))
def test_round_trip_through_rabbitmq_equals_the_codecs_own(amqp_url: str, namespace: str, codec: str) -> None:
    names = Names(namespace)
    tensors = _state_dict()
    c = get_codec(codec)
    chunk_bytes = max(2048, c.payload_nbytes(c.alignment))
    with connect(amqp_url) as transport:
        transport.declare(names, 1)
        stats = streaming.send_container(
            transport,
            names.updates_exchange,
            names.shard_key(0),
            tensors,
            stream="rt",
            meta={"update_id": "u1"},
            codec_for=lambda n, t: c,
            chunk_bytes=chunk_bytes,
        )
        got = streaming.receive_container(transport, names.updates_queue(0), "rt", timeout=30)
    assert got.manifest.meta == {"update_id": "u1"} and stats.chunks == got.manifest.chunks
    assert stats.fp32_bytes == 4 * sum(t.numel() for t in tensors.values())
    expected = _expected(tensors, codec, chunk_bytes)
    for name, t in tensors.items():
        assert got.tensors[name].dtype == t.dtype and torch.equal(got.tensors[name], expected[name])


@pytest.mark.broker
def test_duplicated_and_reordered_through_rabbitmq(amqp_url: str, namespace: str) -> None:
    names = Names(namespace)
    tensors = _state_dict()
    messages = list(streaming.iter_container(tensors, stream="dup", meta={}, chunk_bytes=2048))
    noise = list(streaming.iter_container(_state_dict(5), stream="other", meta={}, chunk_bytes=2048))
    shuffled = messages + messages[2:9] + noise[:4]
    random.Random(11).shuffle(shuffled)
    with connect(amqp_url) as transport:
        transport.declare(names, 1)
        for body in shuffled:
            transport.publish(names.updates_exchange, names.shard_key(0), body)
        transport.flush()
        got = streaming.receive_container(transport, names.updates_queue(0), "dup", timeout=30)
    assert all(torch.equal(got.tensors[n], t) for n, t in tensors.items())


@pytest.mark.broker
def test_receive_into_an_existing_state_dict(amqp_url: str, namespace: str) -> None:
    """Received in place: the caller's tensors (old values overwritten) are the result, duplicated and
    reordered chunks included; a destination of another shape is refused before anything is written."""
    names = Names(namespace)
    tensors = _state_dict()
    messages = list(streaming.iter_container(tensors, stream="in", meta={}, chunk_bytes=2048))
    shuffled = messages + messages[1:6]
    random.Random(3).shuffle(shuffled)
    into = {n: torch.full_like(t, 7.0) for n, t in tensors.items()}
    with connect(amqp_url) as transport:
        transport.declare(names, 1)
        for body in shuffled + messages:
            transport.publish(names.updates_exchange, names.shard_key(0), body)
        transport.flush()
        got = streaming.receive_container(transport, names.updates_queue(0), "in", into=into, timeout=30)
        wrong = {n: torch.zeros(t.numel() + 1, dtype=t.dtype) for n, t in tensors.items()}
        with pytest.raises(StreamError) as info:
            streaming.receive_container(transport, names.updates_queue(0), "in", into=wrong, timeout=30)
    assert info.value.reason == "shape" and all(bool((w == 0).all()) for w in wrong.values())
    for name, t in tensors.items():
        assert torch.equal(into[name], t) and got.tensors[name].data_ptr() == into[name].data_ptr()


@pytest.mark.broker
@pytest.mark.parametrize("encoders", [1, 3])
def test_file_to_stream_to_file_is_byte_identical(
    amqp_url: str, namespace: str, tmp_path: Path, encoders: int
) -> None:
    """Also with several encoder threads, each holding a slice of the file's reused read buffers."""
    names = Names(namespace)
    gen = torch.Generator().manual_seed(1)
    source = save_file(
        {"a": torch.randn(700, 300, generator=gen), "b": torch.randn(33, generator=gen), "c": torch.zeros(0)},
        tmp_path / "in.safetensors",
        {"format": "pt"},
    )
    reader = SafetensorsReader(source)
    with connect(amqp_url) as transport:
        transport.declare(names, 1)
        streaming.send_container(
            transport,
            names.updates_exchange,
            names.shard_key(0),
            reader,
            stream="file",
            meta={"metadata": reader.metadata},
            chunk_bytes=64 << 10,
            encoders=encoders,
        )
        manifest = streaming.receive_file(
            transport, names.updates_queue(0), tmp_path / "out.safetensors", timeout=30
        )
    assert manifest.chunks == 13 + 1 + 1  # 210000 fp32 in 16384s, then b, then the empty c
    assert (tmp_path / "out.safetensors").read_bytes() == source.read_bytes()


@pytest.mark.broker
def test_malformed_messages_are_dead_lettered_and_the_stream_still_arrives(
    amqp_url: str, namespace: str, tmp_path: Path
) -> None:
    """Garbage and a chunk whose payload no longer matches its checksum, ahead of a good stream on the same
    queue: each is dead-lettered once with its reason, and the receive goes on (settling a dead letter a
    second time made the broker close the consumer: 'unknown delivery tag')."""
    names = Names(namespace)
    tensors = _state_dict()
    messages = list(streaming.iter_container(tensors, stream="ok", meta={}, chunk_bytes=4096))
    torn = bytearray(messages[1])
    torn[-1] ^= 0xFF  # the last payload byte of a chunk
    with connect(amqp_url) as transport:
        transport.declare(names, 1)
        for body in [b"not a fedq message", bytes(torn), *messages]:
            transport.publish(names.updates_exchange, names.shard_key(0), body)
        transport.flush()
        streaming.receive_file(transport, names.updates_queue(0), tmp_path / "out.safetensors", timeout=30)
        transport.consume(names.dead_letter_queue, prefetch=10)
        dead = []
        while (delivery := transport.get(2.0)) is not None:
            dead.append(delivery.headers[REASON_HEADER])
            transport.ack(delivery)
    got = SafetensorsReader(tmp_path / "out.safetensors")
    assert all(torch.equal(got[n], t) for n, t in tensors.items())
    assert sorted(dead) == ["bad_magic", "checksum"]


@pytest.mark.broker
def test_incomplete_stream_through_rabbitmq_times_out(amqp_url: str, namespace: str, tmp_path: Path) -> None:
    names = Names(namespace)
    messages = list(streaming.iter_container(_state_dict(), stream="cut", meta={}, chunk_bytes=4096))
    with connect(amqp_url) as transport:
        transport.declare(names, 1)
        for body in messages[:4] + messages[5:]:  # chunk 3 lost
            transport.publish(names.updates_exchange, names.shard_key(0), body)
        transport.flush()
        with pytest.raises(StreamError) as info:
            streaming.receive_file(
                transport, names.updates_queue(0), tmp_path / "out.safetensors", "cut", timeout=1.0
            )
    assert info.value.reason == "timeout"
    assert list(tmp_path.iterdir()) == []  # no partial file left behind


def test_error_feedback_per_chunk_telescopes() -> None:
    """Two rounds with feedback: the receiver got the true updates minus the last residual, nothing else."""
    fb = ErrorFeedback()
    gen = torch.Generator().manual_seed(4)
    rounds = [{"w": torch.randn(64, 1024, generator=gen) * 0.02} for _ in range(2)]
    c = get_codec("nf4")
    chunk_bytes = c.payload_nbytes(c.alignment)  # four chunks, each with its own residual
    received = torch.zeros(64 * 1024)
    for update in rounds:
        messages = list(
            streaming.iter_container(
                update, stream="s", meta={}, codec_for=lambda n, t: c, chunk_bytes=chunk_bytes, feedback=fb
            )
        )
        assert sum(wire.decode(m).kind == "chunk" for m in messages) > 1
        _, out = _assemble(messages)
        received += out["w"]
    per_chunk = streaming.chunk_elements_for(c, chunk_bytes)
    residual = torch.cat(
        [
            fb.compensate("w", torch.zeros(min(per_chunk, 64 * 1024 - lo)), lo)
            for lo in range(0, 64 * 1024, per_chunk)
        ]
    )
    truth = (rounds[0]["w"] + rounds[1]["w"]).reshape(-1)
    assert float(residual.abs().max()) > 1e-4  # nf4 drops something, which feedback carries over
    assert torch.allclose(received, truth - residual, atol=1e-6)


class _Recorder:
    """Just what ``send_container`` calls on a transport: the bodies, in publish order."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    def publish(self, exchange: str, routing_key: str, body: bytes) -> None:
        self.bodies.append(bytes(body))

    def flush(self) -> None:
        pass


def test_several_encoders_send_the_same_messages_and_keep_the_same_residuals() -> None:
    """Encoder threads change when chunks are encoded, never what is sent: two rounds with error feedback
    through 1 and 4 encoders give byte-identical messages, in order, and identical residuals."""
    gen = torch.Generator().manual_seed(6)
    rounds = [{"w": torch.randn(64, 1024, generator=gen) * 0.02, "b": torch.randn(77, generator=gen)}] * 2
    c = get_codec("nf4")
    sent, residuals = [], []
    for encoders in (1, 4):
        fb, recorder = ErrorFeedback(), _Recorder()
        for update in rounds:
            streaming.send_container(
                recorder,  # type: ignore[arg-type]
                "x",
                "k",
                update,
                stream="s",
                meta={},
                codec_for=lambda n, t: c,
                chunk_bytes=c.payload_nbytes(c.alignment),
                feedback=fb,
                encoders=encoders,
            )
        sent.append(recorder.bodies)
        residuals.append(fb.compensate("w", torch.zeros(c.alignment), 2 * c.alignment))
    assert len(sent[0]) > 8
    assert sent[0] == sent[1]
    assert torch.equal(residuals[0], residuals[1])


def test_wait_for_memory_gives_up_with_a_clear_error() -> None:
    from fedq.metrics import current_rss_bytes

    streaming.wait_for_memory(current_rss_bytes() * 2, timeout=0.1)  # well under the budget: returns at once
    with pytest.raises(StreamError) as info:
        streaming.wait_for_memory(current_rss_bytes() // 2, timeout=0.1)
    assert info.value.reason == "memory_budget"


def test_a_lazy_container_computes_each_value_once_and_plans_from_its_spec() -> None:
    """The planner reads shapes and dtypes from ``spec``; a client's delta is computed only when chunked."""
    values = {"a": torch.randn(300, 70), "b": torch.randn(5000)}
    computed: list[str] = []

    def compute(name: str) -> torch.Tensor:
        computed.append(name)
        return values[name]

    lazy = streaming.LazyTensors(
        list(values), compute, lambda n: torch.empty(values[n].shape, dtype=values[n].dtype, device="meta")
    )
    eager = list(streaming.iter_container(values, stream="s", meta={}, chunk_bytes=1 << 14))
    assert list(streaming.iter_container(lazy, stream="s", meta={}, chunk_bytes=1 << 14)) == eager
    assert computed == ["a", "b"]


def _sent_bodies(
    tensors: Mapping[str, torch.Tensor],
    chunk_bytes: int,
    pack: bool = False,
    codec_for: streaming.CodecFor = lambda n, x: get_codec("nf4"),
    encoders: int | None = None,
) -> list[bytes]:
    names = Names("packing")
    with connect(f"memory://{names.namespace}") as t:
        t.declare(names, 1)
        streaming.send_container(
            t,
            names.updates_exchange,
            names.shard_key(0),
            tensors,
            stream="s",
            meta={"update_id": "u"},
            codec_for=codec_for,
            chunk_bytes=chunk_bytes,
            pack=pack,
            encoders=encoders,
        )
        t.consume(names.updates_queue(0), prefetch=1 << 20)
        out = []
        while (d := t.get(0)) is not None:
            out.append(bytes(d.body))
            t.ack(d)
    return out


@pytest.mark.parametrize("chunk_bytes", [2048, 4 << 20])
def test_packed_small_messages_are_the_same_parts_in_fewer_messages(chunk_bytes: int) -> None:
    """Packing changes how many messages carry a stream, not what they carry: a 4 MiB limit sends this
    container as one batch, a 2 KiB one as batches and single messages of at most 2 KiB of parts."""
    tensors = {n: t.float() for n, t in _state_dict().items()}
    single = _sent_bodies(tensors, chunk_bytes, pack=False)
    packed = _sent_bodies(tensors, chunk_bytes, pack=True)
    parts = [bytes(p) for body in packed for _, p in wire.decode_all(body)]
    assert parts == single and len(packed) < len(single)
    if chunk_bytes > 1 << 20:
        assert len(packed) == 1
    for body in packed:
        inner = wire.decode_all(body)
        assert len(inner) == 1 or sum(len(p) for _, p in inner) <= chunk_bytes
    names = Names("packing-rx")
    with connect(f"memory://{names.namespace}") as t:
        t.declare(names, 1)
        for body in packed:
            t.publish(names.updates_exchange, names.shard_key(0), body)
        got = streaming.receive_container(t, names.updates_queue(0), "s", timeout=10)
    _, expected = _assemble(single)
    assert all(torch.equal(got.tensors[n].reshape(-1), expected[n]) for n in tensors)


class _SlowUpdates(ErrorFeedback):
    """Error feedback that takes a while, its residual updates counted as they begin and end (from the
    encoder threads)."""

    def __init__(self) -> None:
        super().__init__()
        self.begun = self.ended = 0
        self.lock = threading.Lock()

    def compensate(self, name: str, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        time.sleep(0.05)
        return super().compensate(name, x, offset)

    def update(self, name: str, sent: torch.Tensor, decoded: torch.Tensor, offset: int = 0) -> None:
        with self.lock:
            self.begun += 1
        time.sleep(0.05)
        super().update(name, sent, decoded, offset)
        with self.lock:
            self.ended += 1


class _Boom(Exception):
    pass


def _explode_after(n: int) -> Callable[[int], None]:
    published = iter(range(n))

    def on_message(_: int) -> None:
        if next(published, None) is None:
            raise _Boom

    return on_message


def test_a_send_that_fails_returns_only_after_the_encodes_it_started() -> None:
    """A send that fails part way (the transport, or a crash as the aggregator's tests inject it) must not
    leave encoder threads behind: they would go on writing residuals, or the aggregator's x̂ file, after the
    caller aborted and closed (or reopened) what they write into."""
    feedback = _SlowUpdates()
    tensors = {f"w{i}": torch.randn(64, 1024) for i in range(4)}  # 16 fp32 chunks of 16 KiB each
    transport, names = MemoryTransport(), Names("unit")
    transport.declare(names, 1)
    try:  # not pytest.raises: it clears the failed call's frames, which is what let its encoders stop
        streaming.send_container(
            transport,
            names.updates_exchange,
            names.shard_key(0),
            tensors,
            stream="s",
            meta={},
            chunk_bytes=16 << 10,
            feedback=feedback,
            on_message=_explode_after(3),
            encoders=2,
        )
    except _Boom:
        running = [t.name for t in threading.enumerate() if t.name.startswith("fedq-encode")]
        begun, ended = feedback.begun, feedback.ended
    else:
        pytest.fail("the send did not fail")
    assert begun >= 1
    assert (ended, running) == (begun, [])


class _SlowTail(type(get_codec("fp32"))):  # type: ignore[misc]
    """fp32 whose encode of a 64-element chunk waits first: that chunk is still with its encoder while the
    sender reads on."""

    def encode_on_device(self, x: torch.Tensor) -> tuple[dict[str, object], torch.Tensor]:
        if x.numel() == 64:
            time.sleep(0.3)
        return super().encode_on_device(x)


def test_a_file_sent_by_several_encoders_arrives_as_it_is_on_disk(tmp_path: Path) -> None:
    """The last chunk of a tensor waits for an encoder while the small tensors after it are read, as a group,
    into the file reader's reused buffers: it must still be sent as it is on disk (it once carried another
    tensor's values: an aggregator's snapshot, late joiners' models)."""
    gen = torch.Generator().manual_seed(3)
    # 16 KiB chunks: big's last 64 elements are a chunk of their own; the others go two to a group, each
    # in file blocks of its own (a read of the same block would put back the same bytes and hide the fault)
    tensors = {"big": torch.randn(4096 + 64, generator=gen)}
    tensors |= {n: torch.randn(1500, generator=gen) for n in "abcdefgh"}
    reader = SafetensorsReader(save_file(tensors, tmp_path / "m.safetensors"))
    bodies = _sent_bodies(reader, 16 << 10, codec_for=lambda n, x: _SlowTail(), encoders=2)
    _, got = _assemble(bodies)
    for name, value in tensors.items():
        assert torch.equal(got[name], value), name

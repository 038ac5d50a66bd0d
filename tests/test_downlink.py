"""Versions as quantized deltas (``--model-codec int8/nf4``, ``fedq.reconstruction``): every client holds the
aggregator's x̂ bit for bit, error feedback keeps x̂ within one version's rounding of x, late joiners start
from a snapshot, frozen tensors never travel again, and a restart republishes the same bytes."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import hypothesis
import pytest
import torch
from hypothesis import strategies as st

from fedq import wire
from fedq.aggregation import service
from fedq.aggregation.state import load
from fedq.cli import main
from fedq.client import Client
from fedq.codecs import choose_codec
from fedq.errors import StreamError
from fedq.protocol import Announcement
from fedq.reconstruction import (
    Reconstruction,
    ReconstructionStep,
    advance,
    file_name,
    is_delta_codec,
    retention_bytes,
)
from fedq.safetensors import SafetensorsReader, save_file
from fedq.streaming import Assembler, iter_container
from fedq.topology import MODELS_SEGMENT_BYTES, Names, models_retention_bytes
from fedq.transport import connect
from tests.aggregation_helpers import Worker, settings
from tests.test_client import every_update, federation, memory_url, perturb, tiny_gpt
from workers import gpt

torch.set_num_threads(1)

SHAPES = {"w": (64, 96), "b": (96,), "frozen": (32, 64)}


def publish(
    recon: Reconstruction, version: int, x: dict[str, torch.Tensor], codec: str, chunk_bytes: int = 4096
) -> list[bytes]:
    """The aggregator's side of one version: the messages of the delta of the tensors that changed."""
    step = recon.step(version)
    changed = {n: t for n, t in x.items() if step.changed(n, t)}
    messages = list(
        iter_container(
            changed,
            stream=f"v{version}",
            meta={},
            codec_for=lambda name, t: choose_codec(name, tuple(t.shape), codec),
            chunk_bytes=chunk_bytes,
            feedback=step,
        )
    )
    step.commit()
    return messages


def apply(held: dict[str, torch.Tensor], messages: list[bytes]) -> set[str]:
    """A client's side: each decoded delta chunk added to what it holds; the tensors that came."""
    assembler = Assembler()
    came = set()
    for body in messages:
        for chunk in assembler.add(wire.decode(body)):
            flat = held[chunk.entry.name].view(-1)
            piece = flat[chunk.offset : chunk.offset + chunk.count].clone()
            flat[chunk.offset : chunk.offset + chunk.count] = advance(piece, chunk.values())
            came.add(chunk.entry.name)
    return came


@pytest.mark.parametrize("codec", ["nf4", "int8"])
def test_every_client_holds_the_reconstruction_exactly_and_the_drift_stays_bounded(
    tmp_path: Path, codec: str
) -> None:
    """50 versions of a random walk: the client's x̂ equals the aggregator's file bit for bit after every
    version; x − x̂ stays one version's rounding (error feedback), where deltas without feedback drift."""
    g = torch.Generator().manual_seed(0)
    x = {n: torch.randn(s, generator=g) * 0.02 for n, s in SHAPES.items()}
    recon = Reconstruction(tmp_path, SHAPES)
    recon.reset(0, x)
    client = {n: t.clone() for n, t in x.items()}  # version 0's snapshot is exact
    naive = {n: t.clone() for n, t in x.items()}  # deltas of x_v - x_{v-1}, no feedback
    previous = {n: t.clone() for n, t in x.items()}
    gaps, naive_gaps = [], []
    for version in range(1, 51):
        for name in ("w", "b"):  # "frozen" never changes
            x[name] = x[name] + torch.randn(SHAPES[name], generator=g) * 1e-3
        came = apply(client, publish(recon, version, x, codec))
        assert "frozen" not in came  # an unchanged tensor is not sent
        with SafetensorsReader(recon.path(version)) as held:
            for name in SHAPES:
                assert torch.equal(client[name], held[name]), (version, name)
        codec_ = choose_codec("w", SHAPES["w"], codec)
        step = x["w"] - previous["w"]
        meta, raw = codec_.encode(step.reshape(-1))
        naive["w"] += codec_.decode(meta, raw, step.numel(), torch.device("cpu")).view(SHAPES["w"])
        previous = {n: t.clone() for n, t in x.items()}
        gaps.append(float((x["w"] - client["w"]).norm()))
        naive_gaps.append(float((x["w"] - naive["w"]).norm()))
        recon.prune(version)
    assert torch.equal(client["frozen"], x["frozen"])
    one_rounding = gaps[0]
    assert max(gaps) < 2 * one_rounding  # bounded: one version's rounding, whatever the number of versions
    assert naive_gaps[-1] > 3 * max(gaps)  # without feedback the errors add up (like sqrt(versions))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recon-v50.safetensors"]


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 300),
    scale=st.floats(1e-6, 1e3),
    codec=st.sampled_from(["nf4", "int8", "fp4"]),
    chunk_bytes=st.sampled_from([256, 4096, 1 << 20]),
    seed=st.integers(0, 2**16),
)
def test_any_shape_scale_and_chunking_reconstructs_exactly(
    rows: int, cols: int, scale: float, codec: str, chunk_bytes: int, seed: int
) -> None:
    """Property: whatever the tensor, its magnitude, the codec and the chunking, a client that applies the
    published deltas holds the aggregator's x̂ bit for bit, version after version."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"m": (rows, cols), "v": (cols,)}
    x = {n: torch.randn(s, generator=g) * scale for n, s in shapes.items()}
    with tempfile.TemporaryDirectory() as directory:
        recon = Reconstruction(Path(directory), shapes)
        recon.reset(0, x)
        client = {n: t.clone() for n, t in x.items()}
        for version in (1, 2, 3):
            x = {n: t + torch.randn(t.shape, generator=g) * scale * 0.01 for n, t in x.items()}
            apply(client, publish(recon, version, x, codec, chunk_bytes))
            with SafetensorsReader(recon.path(version)) as held:
                for name in shapes:
                    assert torch.equal(client[name], held[name]), (version, name)


def test_delta_codecs_are_the_ones_below_16_bits() -> None:
    assert [c for c in ("fp32", "bf16", "fp16", "int8", "nf4", "fp4") if is_delta_codec(c)] == [
        "int8",
        "nf4",
        "fp4",
    ]


def test_a_continuing_client_and_a_late_joiner_hold_the_same_model(tmp_path: Path) -> None:
    """nf4 versions: a client that held every version reads one delta per version (a seventh of fp32); a
    late joiner reads the snapshot and the deltas since; both end with identical models."""
    url = memory_url()
    model = tiny_gpt(seed=1)
    fp32_bytes = 4 * gpt.num_parameters(model)
    with (
        federation(url, "ns", tmp_path, every_update(), model_codec="nf4", snapshot_every=2),
        Client("a", amqp_url=url, namespace="ns") as a,
    ):
        a.receive(model, timeout=30)
        for seed in range(3):
            perturb(model, 0.01, seed=seed)
            a.send(model, num_samples=1)
            before = a.received_bytes
            assert a.receive(model, timeout=30).version == seed + 1
            assert a.received_bytes - before < 0.2 * fp32_bytes  # one nf4 delta, never a snapshot
        with Client("late", amqp_url=url, namespace="ns") as late:
            joined = tiny_gpt(seed=9)
            assert late.receive(joined, timeout=30).version == 3
            # snapshot of version 2 and the delta of version 3
            assert fp32_bytes < late.received_bytes < 1.25 * fp32_bytes
    for (name, mine), theirs in zip(model.state_dict().items(), joined.state_dict().values(), strict=True):
        assert torch.equal(mine, theirs), name
    state = load(tmp_path / "state" / "shard-0", torch.device("cpu"))
    assert state is not None
    global_model, _ = state
    for name, value in model.state_dict().items():  # x̂ is within nf4's rounding of the global model
        assert (value - global_model[name]).norm() <= 0.1 * global_model[name].norm() + 1e-6, name


def test_frozen_tensors_never_travel_after_the_first_download(tmp_path: Path) -> None:
    """A LoRA-like federation: only some tensors train; after the first snapshot the others never travel."""
    url = memory_url()
    model = tiny_gpt(seed=2)
    trainable = {"head.weight", "blocks.0.attn.qkv.weight"}
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    with (
        federation(url, "ns", tmp_path, every_update(), model_codec="nf4"),
        Client("lora", amqp_url=url, namespace="ns", trainable_only=True) as c,
    ):
        c.receive(model, timeout=30)
        seen = record_streams(c)
        for seed in range(2):
            perturb(model, 0.01, seed=seed)
            c.send(model, num_samples=1)
            c.receive(model, timeout=30)
    assert seen and {m.name for m in seen} <= trainable


def record_streams(client: Client) -> list[wire.Message]:
    """Decode a copy of every chunk the client reads from the models stream."""
    seen: list[wire.Message] = []
    get = client.transport.get

    def spy(timeout: float = 0.0):  # type: ignore[no-untyped-def]
        delivery = get(timeout=timeout)
        if delivery is not None and delivery.queue == client.names.models_stream:
            msg = wire.decode(delivery.body)
            if msg.kind == wire.CHUNK:
                seen.append(msg)
        return delivery

    client.transport.get = spy  # type: ignore[method-assign]
    return seen


def test_a_trimmed_chain_says_so(tmp_path: Path) -> None:
    """The snapshot a late joiner needs was trimmed: the error says the version can no longer be read."""
    url = memory_url()
    with connect(url) as transport:
        transport.declare(Names("ns"), 1, models_retention_bytes=100_000)  # tiny_gpt: 239 kB in fp32
    with (
        federation(url, "ns", tmp_path, every_update(), model_codec="nf4"),
        Client("c", amqp_url=url, namespace="ns") as client,
        pytest.raises(StreamError, match="can no longer be read") as caught,
    ):
        client.receive(tiny_gpt(seed=1), timeout=30)  # not the initial weights: it needs the snapshot
    assert caught.value.reason == "version_gone"


@pytest.mark.broker
def test_nf4_versions_through_the_broker(amqp_url: str, namespace: str, tmp_path: Path) -> None:
    """The real broker, --model-codec nf4, a snapshot every 2 versions: a client that stays reads one delta
    per version; one that joins late reads the snapshot and the delta since; both hold identical models."""
    model = tiny_gpt(seed=3)
    fp32_bytes = 4 * gpt.num_parameters(model)
    with (
        federation(amqp_url, namespace, tmp_path, every_update(), model_codec="nf4", snapshot_every=2),
        Client("stays", amqp_url=amqp_url, namespace=namespace, codec="nf4") as stays,
    ):
        stays.receive(model, timeout=60)
        for seed in range(3):
            perturb(model, 0.01, seed=seed)
            stays.send(model, num_samples=1)
            before = stays.received_bytes
            assert stays.receive(model, timeout=60).version == seed + 1
            assert stays.received_bytes - before < 0.2 * fp32_bytes
        with Client("late", amqp_url=amqp_url, namespace=namespace) as late:
            joined = tiny_gpt(seed=8)
            assert late.receive(joined, timeout=60).version == 3
            assert late.received_bytes < 1.25 * fp32_bytes
    for (name, mine), theirs in zip(model.state_dict().items(), joined.state_dict().values(), strict=True):
        assert torch.equal(mine, theirs), name


class Crash(BaseException):
    """The aggregator dies here (a BaseException: nothing on the way catches it)."""


@pytest.mark.parametrize(
    ("where", "snapshot_every"),
    [("mid_delta", 3), ("after_reconstruction", 3), ("mid_snapshot", 2)],
)
def test_a_crash_while_publishing_republishes_the_same_reconstruction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str, snapshot_every: int
) -> None:
    """The aggregator dies while publishing version 2 (part of its delta on the stream, or x̂_2 on disk but the
    state not committed, or part of its snapshot out) and restarts: the client that stayed reads the
    republished delta, a late joiner reads the snapshot and the deltas since (through the partial publication
    and the full one), and both hold the aggregator's x̂_2 exactly."""
    url, names = memory_url(), Names("ns")
    init = save_file(tiny_gpt().state_dict(), tmp_path / "init.safetensors")
    with connect(url) as transport:
        transport.declare(names, 1)
    config = settings(
        names,
        every_update(),
        init,
        tmp_path / "state",
        model_codec="nf4",
        snapshot_every=snapshot_every,
        chunk_bytes=16384,
    )
    model = tiny_gpt(seed=4)
    worker = Worker(url, config)
    with Client("stays", amqp_url=url, namespace="ns") as stays:
        stays.receive(model, timeout=30)
        perturb(model, 0.01, seed=0)
        stays.send(model, num_samples=1)
        assert stays.receive(model, timeout=30).version == 1
        arm_crash(monkeypatch, where)
        perturb(model, 0.01, seed=1)
        stays.send(model, num_samples=1)
        with pytest.raises(Crash):
            worker.join(30)
        monkeypatch.undo()
        worker = Worker(url, config)
        assert stays.receive(model, timeout=30).version == 2
        with Client("late", amqp_url=url, namespace="ns") as late:
            joined = tiny_gpt(seed=9)
            assert late.receive(joined, timeout=30).version == 2
    worker.stop.set()
    worker.join(30)
    theirs = joined.state_dict()
    with SafetensorsReader(tmp_path / "state" / "shard-0" / file_name(2)) as reconstruction:
        for name, mine in model.state_dict().items():
            assert torch.equal(mine, theirs[name]), name
            assert torch.equal(mine, reconstruction[name]), name


def arm_crash(monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """Make the next publication (version 2's) die at ``where``: after x̂_2 is renamed into place, or after
    five messages of its delta or of its snapshot."""
    if where == "after_reconstruction":
        commit = ReconstructionStep.commit

        def commit_then_die(self: ReconstructionStep) -> None:
            commit(self)
            raise Crash

        monkeypatch.setattr(ReconstructionStep, "commit", commit_then_die)
        return
    suffix = "/delta" if where == "mid_delta" else "/s0"
    send = service.send_container

    def send_then_die(*args: object, **kwargs: object) -> object:
        if str(kwargs["stream"]).endswith(suffix):
            sent = iter(range(4))
            kwargs["on_message"] = lambda _: next(sent, None) is None and _die()
        return send(*args, **kwargs)

    monkeypatch.setattr(service, "send_container", send_then_die)


def _die() -> None:
    raise Crash


def test_two_shards_each_publish_the_deltas_of_their_tensors(tmp_path: Path) -> None:
    """Two aggregator shards, nf4 versions: each keeps x̂ of its own tensors; a continuing client and a late
    joiner (the snapshot of version 3 from both shards) hold identical models, and each shard's x̂ file holds
    exactly its tensors' values. At a snapshot version the continuing client may also read the part of one
    shard's snapshot published while the other shard's delta was still coming (one stream carries both)."""
    url, names = memory_url(), Names("ns")
    init = save_file(tiny_gpt().state_dict(), tmp_path / "init.safetensors")
    with connect(url) as transport:
        transport.declare(names, 2)
    workers = [
        Worker(
            url,
            settings(
                names,
                every_update(),
                init,
                tmp_path / "state",
                shard=shard,
                shards=2,
                model_codec="nf4",
                snapshot_every=3,
            ),
        )
        for shard in range(2)
    ]
    model = tiny_gpt(seed=5)
    fp32_bytes = 4 * gpt.num_parameters(model)
    with Client("stays", amqp_url=url, namespace="ns") as stays:
        stays.receive(model, timeout=30)
        for seed in range(3):
            perturb(model, 0.01, seed=seed)
            stays.send(model, num_samples=1)
            before = stays.received_bytes
            assert stays.receive(model, timeout=30).version == seed + 1
            bound = 0.2 if seed + 1 < 3 else 1.2  # version 3 has a snapshot
            assert stays.received_bytes - before < bound * fp32_bytes
        with Client("late", amqp_url=url, namespace="ns") as late:
            joined = tiny_gpt(seed=9)
            assert late.receive(joined, timeout=30).version == 3
    for worker in workers:
        worker.stop.set()
        worker.join(30)
    theirs = joined.state_dict()
    held: dict[str, torch.Tensor] = {}
    for shard in range(2):
        with SafetensorsReader(tmp_path / "state" / f"shard-{shard}" / file_name(3)) as reconstruction:
            held.update({name: reconstruction[name].clone() for name in reconstruction})
    mine = model.state_dict()
    assert held.keys() == mine.keys()
    for name, value in mine.items():
        assert torch.equal(value, theirs[name]), name
        assert torch.equal(value, held[name]), name


def test_retention_holds_two_snapshots_and_the_announced_deltas(capsys: pytest.CaptureFixture[str]) -> None:
    """Two fp32 snapshots and K + 1 nf4 deltas; ``fedq broker definitions`` declares what the aggregator
    does."""
    params = 1_498_482_688
    llama_1b = 4 * params
    whole = models_retention_bytes(llama_1b)
    chained = retention_bytes(llama_1b, "nf4", 10)
    # nf4: 0.516 bytes per parameter (4 bits and the block scales), each delta with a segment of slack
    assert whole + 11 * (0.5 * params + MODELS_SEGMENT_BYTES) < chained
    assert chained < whole + 11 * (0.53 * params + MODELS_SEGMENT_BYTES)
    assert retention_bytes(llama_1b, "bf16", 10) == whole
    args = ["broker", "definitions", "--model-size", str(llama_1b), "--model-codec", "nf4"]
    assert main(args) == 0
    queues = {q["name"]: q["arguments"] for q in json.loads(capsys.readouterr().out)["queues"]}
    assert queues["fedq.models"]["x-max-length-bytes"] == chained


def test_an_announcement_with_a_malformed_chain_is_refused() -> None:
    good = Announcement(3, 1, 10, [("w", (2, 2))], snapshot=(2, 5), deltas=[(2, 4), (3, 10)])
    assert Announcement.parse(good.encode()) == good
    meta = wire.decode(good.encode()).meta
    for bad in ({"snapshot": [2]}, {"deltas": [[3, -1]]}, {"deltas": "3"}):
        body = wire.encode_control(wire.MANIFEST, "version/v3", {**meta, **bad})
        with pytest.raises(StreamError) as caught:
            Announcement.parse(body)
        assert caught.value.reason == "bad_announcement"

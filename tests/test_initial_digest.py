"""A client that already holds the initial weights does not download version 0 (``fedq.initial_digest``): it
reads no byte of version 0, ends bit for bit where a client that downloaded ends, and a model that differs in
a single element downloads as before."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from fedq import wire
from fedq.client import Client
from fedq.errors import StreamError
from fedq.initial_digest import model_digests, shard_digest
from fedq.protocol import INITIAL_SCHEME, Announcement
from fedq.safetensors import save_file
from fedq.topology import Names, versions_names
from fedq.transport import Transport, connect
from tests.aggregation_helpers import Worker, settings
from tests.test_client import every_update, federation, memory_url, perturb, tiny_gpt
from tests.test_downlink import record_streams
from workers import gpt

torch.set_num_threads(1)


def one_element_changed(model: gpt.GPT) -> gpt.GPT:
    """The model with one element of one weight moved to the next float32 up: a single bit differs."""
    with torch.no_grad():
        weight = model.head.weight.view(-1)
        weight[17] = torch.nextafter(weight[17], torch.tensor(float("inf")))
    return model


def v0_read(seen: list[wire.Message]) -> list[str]:
    """The streams of version 0's snapshot or whole version among the chunks a client read."""
    return sorted({m.stream for m in seen if m.stream.startswith("model/v0/")})


def assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, mine), theirs in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(mine, theirs), name


@pytest.mark.broker
def test_a_client_holding_the_initial_weights_reads_only_the_deltas(
    amqp_url: str, namespace: str, tmp_path: Path
) -> None:
    """The real broker, nf4 versions: a client with the initial weights reads zero bytes at version 0 and,
    joining at version 2, only the deltas 1 and 2, never version 0's snapshot; it holds what a client that
    downloaded holds, bit for bit. A client whose model differs in one element downloads the snapshot."""
    fp32_bytes = 4 * gpt.num_parameters(tiny_gpt())
    with (
        federation(amqp_url, namespace, tmp_path, every_update(), model_codec="nf4"),
        Client("holder", amqp_url=amqp_url, namespace=namespace) as holder,
        Client("downloader", amqp_url=amqp_url, namespace=namespace) as downloader,
    ):
        held, downloaded = tiny_gpt(), tiny_gpt(seed=7)  # tiny_gpt() is the aggregator's --init
        seen = record_streams(holder)
        assert holder.receive(held, timeout=60).version == 0
        assert holder.received_bytes == 0 and not seen
        assert downloader.receive(downloaded, timeout=60).version == 0
        assert downloader.received_bytes >= fp32_bytes
        assert_same(held, downloaded)
        for seed in range(2):
            perturb(downloaded, 0.01, seed=seed)
            downloader.send(downloaded, num_samples=1)
            assert downloader.receive(downloaded, timeout=60).version == seed + 1
        with (
            Client("late", amqp_url=amqp_url, namespace=namespace) as late,
            Client("differs", amqp_url=amqp_url, namespace=namespace) as differs,
        ):
            late_model, differing = tiny_gpt(), one_element_changed(tiny_gpt())
            late_seen, differs_seen = record_streams(late), record_streams(differs)
            assert late.receive(late_model, timeout=60).version == 2
            assert v0_read(late_seen) == [] and late_seen  # the deltas, nothing of version 0
            assert late.received_bytes < 0.5 * fp32_bytes  # two nf4 deltas
            assert differs.receive(differing, timeout=60).version == 2
            assert v0_read(differs_seen) == ["model/v0/s0"]
            assert differs.received_bytes > fp32_bytes
    assert_same(late_model, downloaded)
    assert_same(differing, downloaded)


@pytest.mark.broker
@pytest.mark.parametrize("codec", ["fp32", "bf16"])
def test_whole_versions_skip_version_0_itself(
    amqp_url: str, namespace: str, tmp_path: Path, codec: str
) -> None:
    """Versions that travel whole: a client holding version 0's values skips version 0. With ``--model-codec
    bf16`` version 0's values are the init's bf16 rounding, so an fp32 model holding the init itself does not
    match and downloads; a bf16 copy of the init does match."""
    with federation(amqp_url, namespace, tmp_path, every_update(), model_codec=codec):
        with Client("downloader", amqp_url=amqp_url, namespace=namespace) as downloader:
            downloaded = tiny_gpt(seed=7)
            downloader.receive(downloaded, timeout=60)
            assert downloader.received_bytes > 0
        holder_model = tiny_gpt() if codec == "fp32" else tiny_gpt().to(torch.bfloat16)
        with Client("holder", amqp_url=amqp_url, namespace=namespace) as holder:
            assert holder.receive(holder_model, timeout=60).version == 0
            assert holder.received_bytes == 0
        assert_same(holder_model, copy.deepcopy(downloaded).to(holder_model.head.weight.dtype))
        fp32_init = tiny_gpt()
        with Client("fp32-init", amqp_url=amqp_url, namespace=namespace) as other:
            other.receive(fp32_init, timeout=60)
            assert (other.received_bytes == 0) == (codec == "fp32")
        with Client("differs", amqp_url=amqp_url, namespace=namespace) as differs:
            differing = one_element_changed(tiny_gpt())
            differs.receive(differing, timeout=60)
            assert differs.received_bytes > 0
        assert_same(differing, downloaded)


def test_two_shards_announce_a_digest_each(tmp_path: Path) -> None:
    """Two aggregator shards: the announcement carries each shard's digest, the client's per-shard digests
    of the initial model equal them; a client holding it reads nothing for version 0, then one delta."""
    url, names = memory_url(), Names("ns")
    init_model = tiny_gpt()
    init = save_file(init_model.state_dict(), tmp_path / "init.safetensors")
    with connect(url) as transport:
        transport.declare(names, 2)
    workers = [
        Worker(
            url,
            settings(names, every_update(), init, tmp_path / "state", shard=s, shards=2, model_codec="nf4"),
        )
        for s in range(2)
    ]
    try:
        with (
            Client("holder", amqp_url=url, namespace="ns") as holder,
            Client("other", amqp_url=url, namespace="ns") as other,
        ):
            held, downloaded = tiny_gpt(), tiny_gpt(seed=4)
            assert holder.receive(held, timeout=30).version == 0 and holder.received_bytes == 0
            other.receive(downloaded, timeout=30)
            perturb(downloaded, 0.01, seed=0)
            other.send(downloaded, num_samples=1)
            other.receive(downloaded, timeout=30)
            assert holder.receive(held, timeout=30).version == 1
            assert 0 < holder.received_bytes < 0.3 * 4 * gpt.num_parameters(held)
            with connect(url) as transport:
                announcement = newest_announcement(transport, names)
    finally:
        for worker in workers:
            worker.stop.set()
            worker.join(30)
    assert_same(held, downloaded)
    tensors = dict(init_model.state_dict())
    assert announcement.initial == model_digests(tensors, announcement.tensors, 2)
    assert len(set(announcement.initial)) == 2


def newest_announcement(transport: Transport, names: Names) -> Announcement:
    """The last announcement on the versions stream."""
    _, stream = versions_names(names)
    transport.consume(stream, prefetch=64, arguments={"x-stream-offset": "first"})
    newest = None
    while (delivery := transport.get(timeout=1.0)) is not None:
        newest = Announcement.parse(delivery.body)
        transport.ack(delivery)
    assert newest is not None
    return newest


def test_the_digest_follows_the_model_codec() -> None:
    """Delta codecs hash x̂_0 (the init in float32), whole codecs the init through the codec: fp32 and nf4
    agree with the plain float32 digest, bf16 agrees with the digest of the init's bf16 rounding."""
    model = dict(tiny_gpt().state_dict())
    order = list(model)
    announced = [(n, tuple(t.shape)) for n, t in model.items()]
    (plain,) = model_digests(model, announced, 1)
    assert shard_digest(model, order, "fp32") == shard_digest(model, order, "nf4") == plain
    rounded = {n: t.to(torch.bfloat16) for n, t in model.items()}  # 16-bit codecs: every tensor, 1-D too
    assert shard_digest(model, order, "bf16") == model_digests(rounded, announced, 1)[0] != plain


def test_announcements_carry_the_digests_in_a_versioned_field() -> None:
    """Old announcements (no field) and ones in an unknown scheme read as None (the client downloads); a
    malformed field in the known scheme is refused."""
    digests = ["ab" * 32, "cd" * 32]
    announcement = Announcement(3, 2, 0, [("w", (2, 2))], initial=digests)
    assert Announcement.parse(announcement.encode()).initial == digests
    assert Announcement.parse(Announcement(3, 2, 0, [("w", (2, 2))]).encode()).initial is None
    meta = {"version": 3, "shards": 2, "models_offset": 0, "tensors": [["w", [2, 2]]]}
    future = {**meta, "initial": {"scheme": INITIAL_SCHEME + 1, "blake3": ["x"]}}
    assert Announcement.parse(wire.encode_control(wire.MANIFEST, "version/v3", future)).initial is None
    for bad in (["ab" * 32], ["ab" * 32, 5], "ab"):
        body = wire.encode_control(
            wire.MANIFEST, "version/v3", {**meta, "initial": {"scheme": INITIAL_SCHEME, "sha256": bad}}
        )
        with pytest.raises(StreamError) as caught:
            Announcement.parse(body)
        assert caught.value.reason == "bad_announcement"


def test_a_restarted_aggregator_announces_the_digest_and_frozen_tensors_stay_home(tmp_path: Path) -> None:
    """The digest is part of the shard's state: a restarted aggregator announces it with its next version, and
    a LoRA-like client (``trainable_only``) holding the initial weights then reads only the deltas of the
    tensors that train, never version 0, keeping only those as its delta base."""
    url, names = memory_url(), Names("ns")
    trainable = {"head.weight"}
    model = tiny_gpt(seed=3)
    with Client("trainer", amqp_url=url, namespace="ns") as trainer:
        for version in (1, 2):  # the aggregator restarts between the versions
            with federation(url, "ns", tmp_path, every_update(), model_codec="nf4"):
                if version == 1:
                    trainer.receive(model, timeout=30)  # version 0
                with torch.no_grad():
                    model.head.weight.add_(0.01)
                trainer.send(model, num_samples=1)
                assert trainer.receive(model, timeout=30).version == version
                with connect(url) as transport:
                    announced = newest_announcement(transport, names)
                assert announced.version == version and announced.initial is not None
                if version == 1:
                    before = announced.initial
        assert announced.initial == before
        with (
            federation(url, "ns", tmp_path, every_update(), model_codec="nf4"),
            Client("lora", amqp_url=url, namespace="ns", trainable_only=True) as lora,
        ):
            held = tiny_gpt()
            for name, p in held.named_parameters():
                p.requires_grad_(name in trainable)
            seen = record_streams(lora)
            assert lora.receive(held, timeout=30).version == 2
    assert seen and {m.name for m in seen} == trainable and v0_read(seen) == []
    assert set(lora._base or {}) == trainable
    assert_same(held, model)

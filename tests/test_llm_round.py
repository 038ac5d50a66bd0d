"""The round as a user lives it, at any scale: receive only the version wanted, retention that follows the
model, and a clear error when a version was trimmed away."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import hypothesis
import pytest
import torch
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from fedq.basestore import BaseStore
from fedq.broker import Management, q
from fedq.cli import main
from fedq.client import Client, _delta_slicer, _float32_like, codec_policy
from fedq.codecs import EncodedErrorFeedback
from fedq.errors import StreamError
from fedq.metrics import peak_rss_bytes
from fedq.streaming import LazyTensors, iter_container
from fedq.topology import DEFAULT_MODELS_RETENTION_BYTES, MODELS_SEGMENT_BYTES, Names, models_retention_bytes
from fedq.transport import connect
from tests.test_client import every_update, federation, memory_url, perturb, tiny_gpt
from workers import gpt

torch.set_num_threads(1)


def test_retention_follows_the_model_size() -> None:
    assert models_retention_bytes(1 << 20) == DEFAULT_MODELS_RETENTION_BYTES
    llama_1b = 4 * 1_498_482_688
    retention = models_retention_bytes(llama_1b)
    assert 2 * llama_1b + 2 * MODELS_SEGMENT_BYTES <= retention < 2.1 * llama_1b + 2 * MODELS_SEGMENT_BYTES


def test_receive_reads_only_the_version_it_needs(tmp_path: Path) -> None:
    """Three versions on the models stream; a client joining then reads the newest one and nothing else."""
    url = memory_url()
    model = tiny_gpt(seed=1)
    version_bytes = 4 * gpt.num_parameters(model)
    with federation(url, "ns", tmp_path, every_update()), Client("a", amqp_url=url, namespace="ns") as a:
        for seed in range(3):
            a.receive(model, timeout=30)
            perturb(model, 0.01, seed=seed)
            a.send(model, num_samples=1)
        assert a.receive(model, timeout=30).version == 3
        with Client("late", amqp_url=url, namespace="ns", codec="fp32") as late:
            fresh = tiny_gpt(seed=9)
            assert late.receive(fresh, timeout=30).version == 3
    assert version_bytes < late.received_bytes < 1.1 * version_bytes
    assert a.received_bytes < 4 * 1.1 * version_bytes  # four receives, each of one version


def test_a_trimmed_version_says_so(tmp_path: Path) -> None:
    """A models stream declared beforehand far too small for one version (the aggregator uses it as it is):
    a client is told its version was trimmed, not left waiting."""
    url = memory_url()
    with connect(url) as transport:
        transport.declare(Names("ns"), 1, models_retention_bytes=100_000)  # tiny_gpt: 239 kB a version
    with (
        federation(url, "ns", tmp_path, every_update()),
        Client("c", amqp_url=url, namespace="ns") as client,
        pytest.raises(StreamError, match="can no longer be read") as caught,
    ):
        client.receive(tiny_gpt(seed=1), timeout=30)  # not the initial weights: it downloads version 0
    assert caught.value.reason == "version_gone"


@pytest.mark.broker
def test_a_predeclared_stream_with_other_limits_is_used(
    amqp_url: str, namespace: str, management: Management, vhost: str, tmp_path: Path
) -> None:
    """An operator declared the streams beforehand with other limits: the aggregator starts and serves."""
    names = Names(namespace)
    for stream in (names.models_stream, f"{namespace}.versions"):
        management.put(
            f"/queues/{q(vhost)}/{q(stream)}",
            {"durable": True, "arguments": {"x-queue-type": "stream", "x-max-length-bytes": 50_000_000}},
        )
    with (
        federation(amqp_url, namespace, tmp_path, every_update()),
        Client("c", amqp_url=amqp_url, namespace=namespace) as client,
    ):
        assert client.receive(tiny_gpt(seed=1), timeout=30).version == 0


@pytest.mark.broker
def test_a_round_reads_one_version_through_the_broker(amqp_url: str, namespace: str, tmp_path: Path) -> None:
    """Offsets, not timestamps: each receive on the real broker reads its version only."""
    model = tiny_gpt(seed=3)
    version_bytes = 4 * gpt.num_parameters(model)
    with (
        federation(amqp_url, namespace, tmp_path, every_update()),
        Client("c", amqp_url=amqp_url, namespace=namespace, codec="int8") as client,
    ):
        for seed in range(3):
            before = client.received_bytes
            client.receive(model, timeout=60)
            assert client.received_bytes - before < 1.1 * version_bytes
            perturb(model, 0.01, seed=seed)
            client.send(model, num_samples=1)
        assert client.receive(model, timeout=60).version == 3


def test_a_client_keeps_a_fraction_of_its_model(tmp_path: Path) -> None:
    """Lean client: the received version lives on disk, error feedback residuals are kept nf4-encoded, so
    fedq's state in memory is a seventh of the fp32 model; deltas against the stored base stay exact."""
    url = memory_url()
    model = tiny_gpt(seed=5)
    model_bytes = 4 * gpt.num_parameters(model)
    with federation(url, "ns", tmp_path, every_update()), Client("a", amqp_url=url, namespace="ns") as c:
        c.receive(model, timeout=30)
        received = {k: v.clone() for k, v in model.state_dict().items()}
        perturb(model, 0.01, seed=1)
        c.send(model, num_samples=1)
        assert c.feedback is not None and 0 < c.feedback.nbytes < model_bytes / 6
        assert c._base is not None and isinstance(c._base, BaseStore)
        for name, value in received.items():  # the base on disk is exactly what was received
            assert torch.equal(c._base[name], value)
        c.receive(model, timeout=30)


def _sends(
    store: BaseStore, local: dict[str, torch.Tensor], slicer: bool, codec: str, chunk_bytes: int, rounds: int
) -> Iterator[Iterator[bytes]]:
    """The messages of ``rounds`` sends of ``local - store`` with error feedback, a round's training being a
    fixed perturbation; deltas computed a chunk at a time (``slicer``) or a tensor at a time. Each round's
    messages must be read before the next round's."""
    feedback = EncodedErrorFeedback()
    for r in range(rounds):
        tensors = LazyTensors(
            list(local),
            lambda name: store.delta(name, local[name]),
            _float32_like(local),
            (lambda name: _delta_slicer(store, name, local[name])) if slicer else None,
        )
        yield iter_container(
            tensors,
            stream=f"s{r}",
            meta={},
            codec_for=codec_policy(codec),
            chunk_bytes=chunk_bytes,
            feedback=feedback,
        )
        for t in local.values():
            t.add_(1e-3 * (r + 1))


@hypothesis.settings(max_examples=20, deadline=None)
@hypothesis.given(
    rows=st.integers(1, 300),
    cols=st.sampled_from([1, 7, 64, 130]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    stored=st.sampled_from([torch.float32, torch.bfloat16]),
    codec=st.sampled_from(["nf4", "int8", "bf16"]),
    chunk_bytes=st.sampled_from([1 << 10, 3 << 10, 1 << 20]),
    seed=st.integers(0, 2**16),
)
def test_a_delta_computed_a_chunk_at_a_time_sends_the_same_bytes(
    rows: int,
    cols: int,
    dtype: torch.dtype,
    stored: torch.dtype,
    codec: str,
    chunk_bytes: int,
    seed: int,
) -> None:
    """Lean send: a chunk's delta (its base slice read from disk, rounded to the model's dtype, subtracted)
    gives the same messages, error feedback included, as the tensor's whole delta, over three rounds; the
    tensors span many chunks."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"w": (rows, cols), "b": (cols,), "e": (rows * 3, cols)}
    store = BaseStore()
    local: dict[str, dict[str, torch.Tensor]] = {"whole": {}, "chunked": {}}
    for name, shape in shapes.items():
        base = torch.randn(shape, generator=g) * 0.02
        store.reserve(name, shape, stored)
        store.write(name, 0, base.reshape(-1))
        trained = (base + 1e-3 * torch.randn(shape, generator=g)).to(dtype)
        local["whole"][name], local["chunked"][name] = trained, trained.clone()
    try:
        whole = [list(r) for r in _sends(store, local["whole"], False, codec, chunk_bytes, 3)]
        chunked = [list(r) for r in _sends(store, local["chunked"], True, codec, chunk_bytes, 3)]
    finally:
        store.close()
    assert chunked == whole


def test_the_largest_tensor_is_sent_a_chunk_at_a_time() -> None:
    """A chunked send holds a chunk's delta, not the tensor's: its peak RSS grows by less than the tensor's
    float32 size (a bf16 tensor of 512 MiB in float32; nf4 chunks of 4 MiB, 30 MiB of float32). Measured at
    half this size: 214 MiB chunked, 411 MiB with the tensor's whole delta."""
    rows, cols = 65536, 2048
    store = BaseStore()
    store.reserve("e", (rows, cols), torch.float32)
    local = {"e": torch.zeros(rows, cols, dtype=torch.bfloat16)}
    zeros = torch.zeros(1 << 22)
    for lo in range(0, rows * cols, zeros.numel()):
        store.write("e", lo, zeros)
    local["e"].normal_(std=0.02)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from the RSS
        before = peak_rss_bytes()
        for messages in _sends(store, local, True, "nf4", 4 << 20, 2):
            for _ in messages:  # published and let go, as a transport does
                pass
        grown = peak_rss_bytes() - before
    finally:
        store.close()
    assert grown < 384 << 20, grown >> 20


def test_versions_travel_in_the_model_codec(tmp_path: Path) -> None:
    """--model-codec bf16: a bf16 client downloads half the bytes and holds exactly the global's bf16 values;
    1-D tensors stay fp32; the update it sends against that base folds as usual."""
    url = memory_url()
    reference = {k: v.clone() for k, v in tiny_gpt().state_dict().items()}  # the federation's version 0
    model = tiny_gpt(seed=7).to(torch.bfloat16)
    fp32_bytes = 4 * gpt.num_parameters(model)
    with (
        federation(url, "ns", tmp_path, every_update(), model_codec="bf16"),
        Client("b", amqp_url=url, namespace="ns", codec="int8") as c,
    ):
        c.receive(model, timeout=30)
        assert fp32_bytes / 2 < c.received_bytes < 0.55 * fp32_bytes
        for name, value in model.state_dict().items():
            assert torch.equal(value, reference[name].to(torch.bfloat16)), name
        perturb(model, 0.01, seed=2)
        before = _wire_bytes("aggregator", "received")
        sent = c.send(model, num_samples=1)
        assert c.receive(model, timeout=30).version == 1
    # every process counts both directions: the aggregator counted this update's chunks coming in
    assert _wire_bytes("aggregator", "received") - before == pytest.approx(sent.wire_bytes, rel=0.05)
    assert _wire_bytes("client", "received") > 0 and _wire_bytes("aggregator", "sent") > 0


def _wire_bytes(role: str, direction: str) -> float:
    return sum(
        sample.value
        for metric in REGISTRY.collect()
        if metric.name == "fedq_wire_bytes"
        for sample in metric.samples
        if sample.name.endswith("_total")
        and sample.labels["role"] == role
        and sample.labels["direction"] == direction
    )


def test_broker_definitions_size_the_models_stream(capsys: pytest.CaptureFixture[str]) -> None:
    """An operator who applies the topology first declares the retention the aggregator would."""
    assert main(["broker", "definitions", "--model-size", "5716MiB"]) == 0
    queues = {q["name"]: q["arguments"] for q in json.loads(capsys.readouterr().out)["queues"]}
    assert queues["fedq.models"]["x-max-length-bytes"] == models_retention_bytes(5716 << 20)

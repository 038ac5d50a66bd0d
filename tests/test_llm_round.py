"""The round as a user lives it, at any scale: receive only the version wanted, retention that follows the
model, and a clear error when a version was trimmed away."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from prometheus_client import REGISTRY

from fedq.basestore import BaseStore
from fedq.broker import Management, q
from fedq.cli import main
from fedq.client import Client
from fedq.errors import StreamError
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
        client.receive(tiny_gpt(), timeout=30)
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
        assert client.receive(tiny_gpt(), timeout=30).version == 0


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

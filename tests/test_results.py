"""The federation's result as a user gets it, on the real broker: two real aggregator shards, a client, then
``fedq receive`` (the newest complete version), ``fedq export`` (from the state dirs), ``fedq status``; the
files load into a Hugging Face model and name the version's contributors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fedq import cli, streaming
from fedq.aggregation import checkpoint
from fedq.client import Client
from fedq.topology import Names
from fedq.transport import Delivery
from fedq.transport.rabbitmq import RabbitTransport
from tests.hf_models import tiny_gpt2

pytestmark = [pytest.mark.broker, pytest.mark.slow]
ROOT = Path(__file__).parent.parent
BUDGET = ("--memory-budget", "64GiB")  # this test process already holds the suite's memory
VERSIONS = 3


def start_shard(
    amqp_url: str, namespace: str, init: Path, state: Path, shard: int, *extra: str
) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "fedq", "aggregator", "--namespace", namespace, "--init", str(init),
               "--state-dir", str(state), "--shard", str(shard), "--shards", "2", "--strategy", "fedavg",
               "--min-clients", "1", "--max-versions", str(VERSIONS), "--keep-versions", "2",
               "--device", "cpu", "--chunk-bytes", "64KiB", "--memory-budget", "1MiB", *extra]  # fmt: skip
    env = os.environ | {"FEDQ_AMQP_URL": amqp_url, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)


def federate(
    amqp_url: str, namespace: str, tmp_path: Path, step: Callable[[torch.Tensor], object], *extra: str
) -> tuple[Path, Path, torch.nn.Module]:
    """Two real shards (``extra``: more aggregator options) and one client taking ``step`` on every parameter
    for ``VERSIONS`` versions; returns the init directory, the state directory and the client's model, which
    holds the final version."""
    init_dir = tmp_path / "init"
    tiny_gpt2().save_pretrained(init_dir)
    state = tmp_path / "state"
    shards = [start_shard(amqp_url, namespace, init_dir, state, s, *extra) for s in range(2)]
    try:
        model = tiny_gpt2()
        with Client("alice", amqp_url=amqp_url, namespace=namespace) as client:
            for _ in range(VERSIONS):
                client.receive(model, timeout=120)
                with torch.no_grad():
                    for p in model.parameters():
                        step(p)
                client.send(model, num_samples=3)
            client.receive(model, timeout=120)
        for shard in shards:
            _, err = shard.communicate(timeout=120)
            assert shard.returncode == 0, err
    finally:
        for shard in shards:
            if shard.poll() is None:
                shard.kill()
    return init_dir, state, model


def test_receive_export_and_status_give_the_newest_complete_version_with_its_contributors(
    amqp_url: str, names: Names, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    init_dir, state, _ = federate(amqp_url, names.namespace, tmp_path, lambda p: p.add_(0.01))

    received = tmp_path / "received" / "model.safetensors"
    received.parent.mkdir()
    assert (
        cli.main(["receive", str(received), "--namespace", names.namespace, "--amqp-url", amqp_url, *BUDGET])
        == 0
    )
    out = capsys.readouterr().out
    assert f"received version {VERSIONS} (2 shards" in out and "1 contributing updates" in out, out

    exported = tmp_path / "exported.safetensors"
    assert cli.main(["export", str(exported), "--state-dir", str(state)]) == 0
    assert f"exported version {VERSIONS} (2 shards, 1 contributing updates)" in capsys.readouterr().out

    # The same tensors either way: every tensor of the model, from both shards.
    from_broker, from_disk = load_file(received), load_file(exported)
    assert from_broker.keys() == from_disk.keys() == set(tiny_gpt2().state_dict()) - {"lm_head.weight"}
    for name in from_disk:
        assert torch.equal(from_broker[name], from_disk[name]), name
    for path in (received, exported):
        with safe_open(path, "pt") as f:
            meta = f.metadata()
        assert meta["format"] == "pt" and meta["fedq.version"] == str(VERSIONS) and meta["fedq.shards"] == "2"
        (row,) = json.loads(meta["fedq.contributors"])
        assert (
            row["client"] == "guest" and row["staleness"] == 0 and row["weight"] == 3.0
        )  # FedAvg: num_samples
        assert json.loads(meta["fedq.aggregation"])["strategy"] == "fedavg"

    with safe_open(exported, "pt") as f:
        codecs = json.loads(f.metadata()["fedq.codecs"])
    model_fp32 = 4 * sum(t.numel() for t in from_disk.values())
    assert codecs["fp32_bytes"] == model_fp32 and 0 < codecs["wire_bytes"] < model_fp32 / 3, codecs
    assert sum(codecs["elements"].values()) == model_fp32 // 4 and "nf4" in codecs["elements"]

    # Hugging Face loads it next to the model's config: the federated model, with the client's steps in it.
    (received.parent / "config.json").write_text((init_dir / "config.json").read_text())
    import transformers

    loaded = transformers.GPT2LMHeadModel.from_pretrained(received.parent)
    state_dict = loaded.state_dict()
    for name, tensor in from_disk.items():
        assert torch.equal(state_dict[name], tensor), name
    step = state_dict["transformer.wte.weight"] - tiny_gpt2().state_dict()["transformer.wte.weight"]
    assert step.mean().item() == pytest.approx(0.01 * VERSIONS, rel=0.05)  # the client's steps, quantized

    # The last two versions stay on disk, each with its record; an older one is refused with one line.
    for shard in range(2):
        assert checkpoint.versions(state / f"shard-{shard}") == [VERSIONS - 1, VERSIONS]
    older = tmp_path / "older.safetensors"
    assert cli.main(["export", str(older), "--state-dir", str(state), "--version", str(VERSIONS - 1)]) == 0
    assert cli.main(["export", str(older), "--state-dir", str(state), "--version", "1"]) == 2
    assert "not on disk on every shard" in capsys.readouterr().err

    # fedq status names the newest version's contributors.
    assert cli.main(["status", "--namespace", names.namespace, "--amqp-url", amqp_url]) == 0
    status = capsys.readouterr().out
    assert f"newest announced version {VERSIONS}: 1 contributing updates" in status, status
    assert "  guest  update " in status and "staleness 0" in status


def test_receive_writes_what_clients_hold_when_versions_travel_as_deltas(
    amqp_url: str,
    names: Names,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--model-codec nf4: ``fedq receive`` rebuilds x̂ from the snapshot and the deltas since, as a client
    does, and writes it in float32: bit for bit what a client receiving the same version holds, within one
    version's rounding of the aggregator's exact model (``fedq export``)."""
    codec = ("--model-codec", "nf4", "--snapshot-every", "2")
    _, state, model = federate(
        amqp_url, names.namespace, tmp_path, lambda p: p.add_(torch.randn_like(p), alpha=0.01), *codec
    )

    received = tmp_path / "received.safetensors"
    assert (
        cli.main(["receive", str(received), "--namespace", names.namespace, "--amqp-url", amqp_url, *BUDGET])
        == 0
    )
    assert f"received version {VERSIONS} (2 shards" in capsys.readouterr().out
    from_broker = load_file(received)
    held = {n: t for n, t in model.state_dict().items() if n in from_broker}
    assert from_broker.keys() == held.keys() == set(tiny_gpt2().state_dict()) - {"lm_head.weight"}
    for name, tensor in from_broker.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, held[name]), name
    with safe_open(received, "pt") as f:
        assert f.metadata()["fedq.version"] == str(VERSIONS)

    # x̂ trails the exact model x by the nf4 rounding of one version's delta (about a tenth of it), never more
    exported, before = tmp_path / "exported.safetensors", tmp_path / "before.safetensors"
    assert cli.main(["export", str(exported), "--state-dir", str(state)]) == 0
    assert cli.main(["export", str(before), "--state-dir", str(state), "--version", str(VERSIONS - 1)]) == 0
    exact, previous = load_file(exported), load_file(before)
    for name, tensor in from_broker.items():
        step = (exact[name] - previous[name]).norm()
        assert (tensor - exact[name]).norm() <= 0.15 * step, name

    # --memory-budget bounds this read as it bounds a whole version's: it sets the models stream's prefetch,
    # and a process near its budget takes no delivery (the delta path used to read with a fixed prefetch of
    # 16 and no budget). A stream queue honours prefetch per chunk of its log (a version's delta of one shard,
    # ~11 messages here, can come at once), so the read-ahead is compared with a larger budget's.
    consumed, ahead = _spy_on_the_models_stream(monkeypatch, names.models_stream)
    rss = 1 << 20  # the process's RSS as flow_for_budget and wait_for_memory see it
    monkeypatch.setattr(streaming, "current_rss_bytes", lambda: rss)
    within = ["--namespace", names.namespace, "--amqp-url", amqp_url, "--chunk-bytes", "64KiB"]
    read_ahead = {}
    for prefetch in (3, 64):  # a quarter of what the budget leaves above the RSS, in 64 KiB chunks
        budget = rss + prefetch * 4 * (64 << 10)
        again = tmp_path / f"budget-{prefetch}.safetensors"
        assert cli.main(["receive", str(again), *within, "--memory-budget", str(budget)]) == 0
        assert all(torch.equal(t, from_broker[n]) for n, t in load_file(again).items())
        read_ahead[prefetch] = max(ahead)
        ahead.clear()
    assert consumed == [3, 64] and read_ahead[3] < read_ahead[64], (consumed, read_ahead)

    consumed.clear()
    budget = rss + 3 * 4 * (64 << 10)
    # the process is below its budget when the prefetch is set, then at it: the read waits, then says so
    at_start = iter([rss])
    monkeypatch.setattr(streaming, "current_rss_bytes", lambda: next(at_start, budget))
    over = tmp_path / "over-budget.safetensors"
    assert cli.main(["receive", str(over), *within, "--memory-budget", str(budget), "--timeout", "2"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "stays near the budget" in err, err
    assert consumed == [3] and ahead == [] and not over.exists()


def _spy_on_the_models_stream(monkeypatch: pytest.MonkeyPatch, stream: str) -> tuple[list[int], list[int]]:
    """The prefetch of each consumer of ``stream``, and at each delivery of it taken, how many of its
    deliveries the broker had sent ahead (the one taken, and those still buffered in the transport)."""
    consumed: list[int] = []
    ahead: list[int] = []
    consume, get = RabbitTransport.consume, RabbitTransport.get

    def spy_consume(self: RabbitTransport, queue: str, *, prefetch: int, **kw: Any) -> str:
        if queue == stream:
            consumed.append(prefetch)
        return consume(self, queue, prefetch=prefetch, **kw)

    def spy_get(self: RabbitTransport, timeout: float | None = None) -> Delivery | None:
        delivery = get(self, timeout)
        if delivery is not None and delivery.queue == stream:
            ahead.append(1 + sum(d.queue == stream for d in self._deliveries))
        return delivery

    monkeypatch.setattr(RabbitTransport, "consume", spy_consume)
    monkeypatch.setattr(RabbitTransport, "get", spy_get)
    return consumed, ahead

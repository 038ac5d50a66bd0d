"""Hugging Face and PEFT models through the three calls, on the real broker against a real aggregator: tied
weights, PEFT adapter names, wrappers, integer buffers, atomic receive, empty updates, the end of a
federation. Every model is built from a config (tests/hf_models.py); nothing is downloaded."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from fedq import wire
from fedq.aggregation.strategies import FedAvg, FedBuff
from fedq.client import Client
from fedq.errors import ConfigError, FederationEnded, TransportError
from fedq.protocol import UpdateMeta
from fedq.streaming import send_container
from fedq.topology import Names
from fedq.transport import connect
from fedq.transport.base import REASON_HEADER
from tests.aggregation_helpers import Worker, model_of, settings, state, wait_version
from tests.hf_models import aggregator, perturb, tiny_gpt2, tiny_llama, with_lora

pytestmark = pytest.mark.broker
torch.set_num_threads(1)
TIED = ("transformer.wte.weight", "lm_head.weight")


def save_init(model: torch.nn.Module, form: str, directory: Path) -> Path:
    """The initial model the way a Hugging Face user has it."""
    if form == "save_pretrained":
        model.save_pretrained(directory / "hf")  # type: ignore[operator]
        return directory / "hf"
    if form == "sharded":
        model.save_pretrained(directory / "hf", max_shard_size="20KB")  # type: ignore[operator]
        assert (directory / "hf" / "model.safetensors.index.json").is_file()
        return directory / "hf"
    if form == "save_model":
        safetensors.torch.save_model(model, str(directory / "model.safetensors"))
        return directory / "model.safetensors"
    torch.save(model.state_dict(), directory / "model.pt")
    return directory / "model.pt"


def record_names(client: Client) -> list[str]:
    """The tensor names of every chunk the client publishes."""
    seen: list[str] = []
    publish = client.transport.publish

    def spy(exchange: str, routing_key: str, body: bytes, **kwargs: object) -> None:
        seen.extend(msg.name for msg, _ in wire.decode_all(body) if msg.kind == wire.CHUNK)
        publish(exchange, routing_key, body, **kwargs)  # type: ignore[arg-type]

    client.transport.publish = spy  # type: ignore[method-assign]
    return seen


@pytest.mark.parametrize("form", ["save_pretrained", "sharded", "save_model", "pt"])
def test_tied_weights_travel_once_and_land_in_every_alias(
    amqp_url: str, namespace: str, tmp_path: Path, form: str
) -> None:
    init = save_init(tiny_gpt2(seed=0), form, tmp_path)
    v0 = tiny_gpt2(seed=0).state_dict()
    model = tiny_gpt2(seed=1)  # a client's own random initialisation
    with (
        aggregator(amqp_url, namespace, init, tmp_path / "state") as state_dir,
        Client("tied", amqp_url=amqp_url, namespace=namespace, codec="fp32", trainable_only=True) as client,
    ):
        client.receive(model, timeout=60)
        assert torch.equal(model.lm_head.weight, v0["transformer.wte.weight"])
        sent_names = record_names(client)
        perturb(model, 0.01, seed=2)
        trained = model.transformer.wte.weight.detach().clone()
        client.send(model, num_samples=1)
        client.receive(model, timeout=60)
        global_model = model_of(state_dir)
    held = [name for name in TIED if name in global_model]
    assert len(held) == 1  # the aggregator holds (and checkpoints) the tied tensor once
    assert sent_names.count(held[0]) == 1 and not set(TIED) - {held[0]} & set(sent_names)
    torch.testing.assert_close(global_model[held[0]], trained, rtol=0, atol=1e-6)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # still tied
    torch.testing.assert_close(model.lm_head.weight.detach(), trained, rtol=0, atol=1e-6)


def test_peft_adapter_directory_and_adapter_names(amqp_url: str, namespace: str, tmp_path: Path) -> None:
    """A PEFT adapter directory is the global; a PeftModel's ``.default`` names match it; its base stays."""
    lora = {"r": 8, "lora_alpha": 16}
    with_lora(tiny_llama(seed=0, width=128), **lora).save_pretrained(tmp_path / "adapter")  # type: ignore[operator]
    model = with_lora(tiny_llama(seed=0, width=128), **lora)
    frozen = {n: t.clone() for n, t in model.state_dict().items() if "lora_" not in n}
    with aggregator(amqp_url, namespace, tmp_path / "adapter", tmp_path / "state") as state_dir:
        with Client("full", amqp_url=amqp_url, namespace=namespace) as everything:
            everything.receive(model, timeout=60)
            with pytest.raises(ConfigError, match="trainable_only=True"):
                everything.send(
                    model, num_samples=1
                )  # the frozen base is not in the global: said, not dropped
        with Client("lora", amqp_url=amqp_url, namespace=namespace, trainable_only=True) as client:
            client.receive(model, timeout=60)
            perturb(model, 0.01, seed=3)
            sent = client.send(model, num_samples=1)
            client.receive(model, timeout=60)
            global_model = model_of(state_dir)
    assert sent.tensors == 4 and len(global_model) == 4
    # LoRA compressed where it pays: measured 4.08x for this update, 0.90x while matrices under 4,096
    # elements stayed fp32 (nf4 payloads plus manifest, chunk headers and commit)
    assert sent.fp32_bytes > 3.5 * sent.wire_bytes
    assert all(".default." not in name and "lora_" in name for name in global_model)
    local = {n.replace(".default", ""): t for n, t in model.state_dict().items() if "lora_" in n}
    for name, tensor in global_model.items():  # nf4 with error feedback: the client holds the global
        torch.testing.assert_close(local[name], tensor, rtol=0, atol=0)
    assert any(float(t.abs().max()) > 0 for n, t in global_model.items() if "lora_B" in n)  # B trained
    for name, tensor in frozen.items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_a_peft_model_against_a_plain_global_is_told_what_to_start_from(
    amqp_url: str, namespace: str, tmp_path: Path
) -> None:
    """The aggregator started from the base model's save_pretrained directory holds no adapters: a PeftModel
    is refused before anything is written, with the two ways out (the adapter directory, the base model)."""
    init = save_init(tiny_llama(seed=0), "save_pretrained", tmp_path)
    model = with_lora(tiny_llama(seed=1))
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with (
        aggregator(amqp_url, namespace, init, tmp_path / "state"),
        Client("peft", amqp_url=amqp_url, namespace=namespace, trainable_only=True) as client,
        pytest.raises(ConfigError, match=r"--init the adapter directory.*merge_and_unload"),
    ):
        client.receive(model, timeout=60)
    assert all(torch.equal(model.state_dict()[n], t) for n, t in before.items())


def test_state_dicts_wrappers_and_empty_updates(amqp_url: str, namespace: str, tmp_path: Path) -> None:
    init = save_init(tiny_llama(seed=0), "pt", tmp_path)
    model = tiny_llama(seed=5)
    with (
        aggregator(amqp_url, namespace, init, tmp_path / "state") as state_dir,
        Client("dicts", amqp_url=amqp_url, namespace=namespace, codec="fp32", trainable_only=True) as client,
    ):
        plain = model.state_dict()  # tensors without requires_grad
        client.receive(plain, timeout=60)  # received into a plain state dict ...
        with pytest.raises(ConfigError, match=r"nothing to send.*keep_vars"):
            client.send(plain, num_samples=1)  # ... which trainable_only cannot send: refused, nothing sent
        time.sleep(1.0)
        assert state(state_dir)["version"] == 0  # the aggregator saw no update
        perturb(model, 0.01, seed=6)
        client.send(model, num_samples=1)  # ... while the module it belongs to can

        compiled = torch.compile(tiny_llama(seed=7))  # `_orig_mod.` names
        assert client.receive(compiled, timeout=60).version == 1
        perturb(compiled, 0.01, seed=10)
        client.send(compiled, num_samples=1)
        parallel = torch.nn.DataParallel(tiny_llama(seed=8))  # `module.` names
        assert client.receive(parallel, timeout=60).version == 2
        prefixed = {f"module.{n}": t for n, t in tiny_llama(seed=9).state_dict().items()}
        with Client("prefixed", amqp_url=amqp_url, namespace=namespace) as reader:
            assert reader.receive(prefixed, timeout=60).version == 2
        half = tiny_llama(seed=11).to(torch.bfloat16)
        with Client("bf16", amqp_url=amqp_url, namespace=namespace) as reader:
            assert reader.receive(half, timeout=60).version == 2
        global_model = model_of(state_dir)
    for name, tensor in global_model.items():
        torch.testing.assert_close(compiled.state_dict()[f"_orig_mod.{name}"], tensor, rtol=0, atol=1e-6)
        torch.testing.assert_close(parallel.state_dict()[f"module.{name}"], tensor, rtol=0, atol=0)
        torch.testing.assert_close(prefixed[f"module.{name}"].detach(), tensor, rtol=0, atol=0)
        assert torch.equal(half.state_dict()[name], tensor.to(torch.bfloat16))


def test_receive_is_atomic(amqp_url: str, namespace: str, tmp_path: Path) -> None:
    init = save_init(tiny_llama(seed=0), "pt", tmp_path)
    v0 = tiny_llama(seed=0).state_dict()
    with (
        aggregator(amqp_url, namespace, init, tmp_path / "state"),
        Client("atomic", amqp_url=amqp_url, namespace=namespace, codec="fp32") as client,
    ):
        wider = tiny_llama(seed=1, width=48)
        before = {n: t.clone() for n, t in wider.state_dict().items()}
        with pytest.raises(ConfigError, match="shape"):
            client.receive(wider, timeout=60)  # refused before anything is written
        assert all(torch.equal(wider.state_dict()[n], t) for n, t in before.items())

        model = tiny_llama(seed=2)
        before = {n: t.clone() for n, t in model.state_dict().items()}
        get, seen = client.transport.get, []

        def failing_get(timeout: float) -> object:
            delivery = get(timeout=timeout)
            if delivery is not None and delivery.queue == client.names.models_stream:
                seen.append(delivery)
                if len(seen) == 3:  # the manifest and two chunks decoded: the connection drops
                    raise TransportError("connection lost (injected)", reason="connection")
            return delivery

        client.transport.get = failing_get  # type: ignore[assignment, method-assign]
        with pytest.raises(TransportError):
            client.receive(model, timeout=60)
        client.transport.get = get  # type: ignore[method-assign]
        assert all(torch.equal(model.state_dict()[n], t) for n, t in before.items())  # untouched
        with pytest.raises(ConfigError, match="receive"):
            client.send(model, num_samples=1)  # no base to diff against

        transposed = torch.nn.Parameter(model.lm_head.weight.detach().t().contiguous().t())
        model.lm_head.weight = transposed  # a non-contiguous parameter (same shape, column-major)
        assert not model.lm_head.weight.is_contiguous()
        client.receive(model, timeout=60)
        assert torch.equal(model.lm_head.weight, v0["lm_head.weight"])
        perturb(model, 0.01, seed=3)
        client.send(model, num_samples=1)
        assert client.receive(model, timeout=60).version == 1


class WithCounter(torch.nn.Module):
    """A model with an integer buffer, as many HF models have (position ids, step counters)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.proj = torch.nn.Linear(32, 32)
        self.register_buffer("position_ids", torch.arange(64) + seed)


@pytest.mark.parametrize("form", ["safetensors", "pt"])
def test_integer_buffers_stay_local_from_any_init(
    amqp_url: str, namespace: str, tmp_path: Path, form: str
) -> None:
    source = WithCounter(seed=0)
    if form == "safetensors":
        init = tmp_path / "init.safetensors"
        safetensors.torch.save_file(source.state_dict(), str(init))
    else:
        init = tmp_path / "init.pt"
        torch.save(source.state_dict(), init)
    model = WithCounter(seed=1)
    with (
        aggregator(amqp_url, namespace, init, tmp_path / "state") as state_dir,
        Client("ints", amqp_url=amqp_url, namespace=namespace, codec="fp32") as client,
    ):
        client.receive(model, timeout=60)
        perturb(model, 0.01, seed=1)
        client.send(model, num_samples=1)
        client.receive(model, timeout=60)
        assert set(model_of(state_dir)) == {"proj.weight", "proj.bias"}
    assert torch.equal(model.position_ids, torch.arange(64) + 1)  # the client's own, untouched


def test_a_client_learns_that_the_federation_ended(amqp_url: str, namespace: str, tmp_path: Path) -> None:
    init = save_init(tiny_llama(seed=0), "pt", tmp_path)
    model = tiny_llama(seed=1)
    with (
        aggregator(amqp_url, namespace, init, tmp_path / "state", max_versions=1),
        Client("end", amqp_url=amqp_url, namespace=namespace) as client,
    ):
        rounds = []
        while True:  # the README's loop
            round_ = client.receive(model, timeout=60)
            rounds.append(round_)
            if round_.final:
                break
            with pytest.raises(ConfigError, match="full=True"):
                client.send(model, num_samples=1, full=True)  # nf4 weights would replace the global's
            perturb(model, 0.01, seed=2)
            client.send(model, num_samples=1)
        with pytest.raises(FederationEnded, match="never be folded"):
            client.send(model, num_samples=1)  # after the final version: said, not queued for no one
        started = time.monotonic()
        with pytest.raises(FederationEnded):
            client.receive(model, timeout=60)
        assert time.monotonic() - started < 10.0  # at once, not after the 60 s timeout
        with Client("late", amqp_url=amqp_url, namespace=namespace) as late:
            assert late.receive(tiny_llama(seed=3), timeout=60).final  # a late joiner gets the final model
            with pytest.raises(FederationEnded):
                late.receive(tiny_llama(seed=3), timeout=60)
    assert [(r.version, r.final) for r in rounds] == [(0, False), (1, True)]


def test_adapters_of_one_shard_fold_on_two_shards(amqp_url: str, namespace: str, tmp_path: Path) -> None:
    """trainable_only sends every shard its container, empty or not: a version needs every shard's commit."""
    init = save_init(tiny_llama(seed=0), "pt", tmp_path)
    strategy = FedBuff(buffer_size=1, server_lr=1.0, staleness="constant")
    workers = [
        Worker(amqp_url, settings(Names(namespace), strategy, init, tmp_path / "state", shard=s, shards=2))
        for s in range(2)
    ]
    model = tiny_llama(seed=1)
    for name, p in model.named_parameters():
        p.requires_grad_(name == "lm_head.weight")  # one tensor: one shard's
    try:
        with Client("one", amqp_url=amqp_url, namespace=namespace, trainable_only=True) as client:
            client.receive(model, timeout=60)
            perturb(model, 0.01, seed=2)
            assert client.send(model, num_samples=1).tensors == 1
            assert client.receive(model, timeout=60).version == 1
        wait_version(tmp_path / "state", 1, shards=2)
    finally:
        for worker in workers:
            worker.stop.set()
        for worker in workers:
            worker.join(30)


@pytest.mark.parametrize("count", [0, None])
def test_the_aggregator_refuses_an_update_without_tensors(
    amqp_url: str, namespace: str, tmp_path: Path, count: int | None
) -> None:
    """A hand-made empty update (fedq's client refuses to send one) is dead-lettered, never folded."""
    init = save_init(tiny_llama(seed=0), "pt", tmp_path)
    names = Names(namespace)
    with aggregator(amqp_url, namespace, init, tmp_path / "state") as state_dir, connect(amqp_url) as t:
        wait_version(state_dir, 0)
        meta = UpdateMeta("empty", 0, 10, update_tensors=count).to_meta()
        send_container(t, names.updates_exchange, names.shard_key(0), {}, stream="x/empty/s0", meta=meta)
        t.flush()
        t.consume(names.dead_letter_queue, prefetch=10)
        delivery = t.get(30)
        assert delivery is not None and delivery.headers.get(REASON_HEADER) == "empty_update"
        t.ack(delivery)
        assert state(state_dir)["version"] == 0


def test_an_update_that_claims_tensors_it_lacks_is_never_folded(
    amqp_url: str, namespace: str, tmp_path: Path
) -> None:
    """A hand-made update whose manifest claims tensors (``update_tensors``) but whose stream has none passes
    the shard's check (one shard's stream of a real update may be empty) and is refused by the leader's plan:
    the next version folds only the honest update and records the lie as dropped."""
    init = save_init(tiny_llama(seed=0), "pt", tmp_path)
    names = Names(namespace)
    with aggregator(amqp_url, namespace, init, tmp_path / "state") as state_dir, connect(amqp_url) as t:
        wait_version(state_dir, 0)
        meta = UpdateMeta("liar", 0, 10, update_tensors=3).to_meta()
        send_container(t, names.updates_exchange, names.shard_key(0), {}, stream="x/liar/s0", meta=meta)
        t.flush()
        model = tiny_llama(seed=1)
        with Client("honest", amqp_url=amqp_url, namespace=namespace, codec="fp32") as client:
            client.receive(model, timeout=60)
            perturb(model, 0.01, seed=2)
            honest = client.send(model, num_samples=1)
            assert client.receive(model, timeout=60).version == 1
        record = json.loads((state_dir / "shard-0" / "model-v1.json").read_text())
    assert [c["update_id"].endswith(honest.update_id) for c in record["contributors"]] == [True]
    assert [(update.endswith("/liar"), reason) for update, reason in record["dropped"]] == [
        (True, "empty_update")
    ]


def test_peft_modules_to_save_travel_with_the_adapters(amqp_url: str, namespace: str, tmp_path: Path) -> None:
    """A PEFT model that trains a whole copy of ``lm_head`` (``modules_to_save``) next to its adapters: the
    copy travels under its saved name and lands in the copy; the frozen original stays as it was."""
    lora = {"modules_to_save": ["lm_head"]}
    with_lora(tiny_llama(seed=0), **lora).save_pretrained(tmp_path / "adapter")  # type: ignore[operator]
    model = with_lora(tiny_llama(seed=0), **lora)
    original = model.base_model.model.lm_head.original_module.weight.detach().clone()
    with (
        aggregator(amqp_url, namespace, tmp_path / "adapter", tmp_path / "state") as state_dir,
        Client("copy", amqp_url=amqp_url, namespace=namespace, codec="fp32", trainable_only=True) as client,
    ):
        client.receive(model, timeout=60)
        perturb(model, 0.01, seed=4)
        trained = model.base_model.model.lm_head.modules_to_save.default.weight.detach().clone()
        assert client.send(model, num_samples=1).tensors == 5  # 4 adapter matrices and the head's copy
        client.receive(model, timeout=60)
        global_model = model_of(state_dir)
    head = "base_model.model.lm_head.weight"
    assert set(global_model) - {head} == {n for n in global_model if "lora_" in n} and head in global_model
    torch.testing.assert_close(global_model[head], trained, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.base_model.model.lm_head.modules_to_save.default.weight, trained)
    assert torch.equal(model.base_model.model.lm_head.original_module.weight, original)


def test_dora_magnitudes_travel_under_their_saved_names(
    amqp_url: str, namespace: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """DoRA: the model's ``lora_magnitude_vector.default.weight`` is ``lora_magnitude_vector`` in the saved
    adapter directory; it matches, travels and lands (it was refused as a missing tensor before)."""
    with_lora(tiny_llama(seed=0), use_dora=True).save_pretrained(tmp_path / "adapter")  # type: ignore[operator]
    model = with_lora(tiny_llama(seed=0), use_dora=True)
    with (
        aggregator(amqp_url, namespace, tmp_path / "adapter", tmp_path / "state") as state_dir,
        Client("dora", amqp_url=amqp_url, namespace=namespace, codec="fp32", trainable_only=True) as client,
    ):
        with caplog.at_level(logging.WARNING, logger="fedq.client"):
            client.receive(model, timeout=60)
        # the adapter directory: nothing travels that this client does not train
        assert not [r for r in caplog.records if r.name == "fedq.client"]
        perturb(model, 0.01, seed=1)
        assert client.send(model, num_samples=1).tensors == 6  # A, B and the magnitude of q_proj and v_proj
        client.receive(model, timeout=60)
        global_model = model_of(state_dir)
    magnitude = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    local = model.base_model.model.model.layers[0].self_attn.q_proj.lora_magnitude_vector["default"].weight
    assert magnitude in global_model
    torch.testing.assert_close(local.detach(), global_model[magnitude], rtol=0, atol=1e-6)
    assert not torch.equal(
        global_model[magnitude],
        with_lora(tiny_llama(seed=0), use_dora=True).state_dict()[
            "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector.default.weight"
        ],
    )  # trained: the update carried it


def test_rounds_of_fedavg_give_the_weighted_mean_and_only_adapters_are_sent(
    amqp_url: str, namespace: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two LoRA clients, three FedAvg rounds (fp32, no error feedback) against a global that holds the whole
    PeftModel: each version is the previous one plus the sample-weighted mean of the two deltas, both clients
    hold it bit for bit, and what they send is the adapters alone. A model with an extra trainable tensor
    (LoRA on k_proj too) is told right after its first receive, not at its first send."""
    init = tmp_path / "model.pt"
    torch.save(with_lora(tiny_llama(seed=0, width=64)).state_dict(), init)
    models = [with_lora(tiny_llama(seed=0, width=64)) for _ in range(2)]
    adapter_bytes = sum(4 * p.numel() for p in models[0].parameters() if p.requires_grad)
    strategy = FedAvg(min_clients=2, round_timeout=60.0)
    worker = Worker(amqp_url, settings(Names(namespace), strategy, init, tmp_path / "state"))
    clients = [
        Client(f"c{i}", amqp_url=amqp_url, namespace=namespace, codec="fp32", trainable_only=True)
        for i in range(2)
    ]
    try:
        with caplog.at_level(logging.WARNING, logger="fedq.client"):
            for client, model in zip(clients, models, strict=True):
                client.receive(model, timeout=60)
        # the global holds the frozen base, read again at every version: said once per client
        assert sum("--init the adapter directory" in r.getMessage() for r in caplog.records) == 2
        extra = with_lora(tiny_llama(seed=0, width=64), target_modules=["q_proj", "k_proj", "v_proj"])
        with Client("extra", amqp_url=amqp_url, namespace=namespace, trainable_only=True) as mistaken:
            mistaken.receive(extra, timeout=60)
            with pytest.raises(ConfigError, match=r"does not have.*k_proj\.lora_A"):
                mistaken.check_sendable(extra)
        for round in range(3):
            previous = {n: t.clone() for n, t in models[0].state_dict().items()}
            deltas = []
            for i, (client, model) in enumerate(zip(clients, models, strict=True)):
                perturb(model, 0.01, seed=10 * round + i)
                deltas.append({n: t - previous[n] for n, t in model.state_dict().items()})
                sent = client.send(model, num_samples=1 + i)
                assert sent.tensors == 4 and sent.fp32_bytes == adapter_bytes
            for client, model in zip(clients, models, strict=True):
                assert client.receive(model, timeout=60).version == round + 1
            for name, tensor in models[0].state_dict().items():
                expected = previous[name] + (deltas[0][name] + 2 * deltas[1][name]) / 3
                torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-6)
                assert torch.equal(tensor, models[1].state_dict()[name])
    finally:
        for client in clients:
            client.close()
        worker.stop.set()
        worker.join(30)

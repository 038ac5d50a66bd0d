"""fedq.hf.FedqCallback: a transformers Trainer and TRL's SFTTrainer join a federation unchanged, on the real
broker against a real aggregator, with tiny Llama models built from configs and PEFT adapters."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
import transformers
import trl
from peft import LoraConfig

from fedq.errors import ConfigError
from fedq.hf import FedqCallback
from tests.aggregation_helpers import model_of
from tests.hf_models import aggregator, char_tokenizer, tiny_llama, with_lora

pytestmark = [pytest.mark.broker, pytest.mark.slow]
torch.set_num_threads(1)
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


class Pattern(torch.utils.data.Dataset):
    """Sequences of a repeating token pattern: a loss a tiny model can lower in a few steps."""

    def __init__(self, count: int = 64, length: int = 32) -> None:
        self.rows = [torch.arange(i, i + length) % 7 + 3 for i in range(count)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def pattern_loss(model: torch.nn.Module) -> float:
    batch = torch.stack([Pattern()[i]["input_ids"] for i in range(8)])
    with torch.no_grad():
        return float(model(input_ids=batch, labels=batch).loss)


def training_args(tmp_path: Path, cls: type = transformers.TrainingArguments, **extra: object) -> object:
    return cls(
        output_dir=str(tmp_path / "out"),
        max_steps=100,  # the federation ends first
        per_device_train_batch_size=4,
        learning_rate=3e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        **extra,
    )


def test_trainer_with_peft_adapters_joins_a_federation(amqp_url: str, namespace: str, tmp_path: Path) -> None:
    with_lora(tiny_llama(seed=0)).save_pretrained(tmp_path / "adapter")  # type: ignore[operator]
    model = with_lora(tiny_llama(seed=0))  # the user's model and Trainer, unchanged ...
    before = pattern_loss(model)
    callback = FedqCallback("trainer", amqp_url=amqp_url, namespace=namespace)  # ... plus this
    trainer = transformers.Trainer(
        model=model, args=training_args(tmp_path), train_dataset=Pattern(), callbacks=[callback]
    )
    with aggregator(
        amqp_url,
        namespace,
        tmp_path / "adapter",
        tmp_path / "state",
        max_versions=3,
        client_config={"local_steps": 4},
    ) as state_dir:
        trainer.train()
        global_model = model_of(state_dir)
        late_model = with_lora(tiny_llama(seed=0))  # a Trainer that joins after the end ...
        late = transformers.Trainer(
            model=late_model,
            args=training_args(tmp_path),
            train_dataset=Pattern(),
            callbacks=[FedqCallback("late", amqp_url=amqp_url, namespace=namespace)],
        )
        late.train()
        wrong = FedqCallback("wrong", amqp_url=amqp_url, namespace=namespace)
        other = with_lora(tiny_llama(seed=0, width=48))  # another configuration: refused, connection closed
        with pytest.raises(ConfigError, match="shape"):
            transformers.Trainer(
                model=other, args=training_args(tmp_path), train_dataset=Pattern(), callbacks=[wrong]
            ).train()
        assert wrong.client is None
        # adapters the global lacks: refused before a step, not at the first send
        more = with_lora(tiny_llama(seed=0), target_modules=["q_proj", "k_proj", "v_proj"])
        extra = transformers.Trainer(
            model=more,
            args=training_args(tmp_path),
            train_dataset=Pattern(),
            callbacks=[FedqCallback("extra", amqp_url=amqp_url, namespace=namespace)],
        )
        with pytest.raises(ConfigError, match=r"does not have.*k_proj\.lora_A"):
            extra.train()
        assert extra.state.global_step == 0
    assert trainer.state.global_step == 12  # three rounds of the aggregator's local_steps, then the end
    assert callback.round is not None and callback.round.version == 3 and callback.round.final
    assert callback.client is None  # closed at the end of training
    local = {n.replace(".default", ""): t for n, t in model.state_dict().items() if "lora_" in n}
    assert set(local) == set(global_model)  # only the adapters travelled
    for name, tensor in global_model.items():  # the model ends as the federation's final model
        assert torch.equal(local[name], tensor), name
    assert late.state.global_step == 1  # ... takes the one step a Trainer takes before it checks for a stop
    late_local = {n.replace(".default", ""): t for n, t in late_model.state_dict().items() if "lora_" in n}
    for name, tensor in global_model.items():  # ... and still ends on the final model
        assert torch.equal(late_local[name], tensor), name
    assert pattern_loss(model) < before - 0.15  # measured: 4.566 -> 4.321


def test_sft_trainer_with_peft_config_joins_a_federation(
    amqp_url: str, namespace: str, tmp_path: Path
) -> None:
    text = "to be or not to be, that is the question. " * 8
    tokenizer = char_tokenizer(text)
    with_lora(tiny_llama(seed=0), **LORA).save_pretrained(tmp_path / "adapter")  # type: ignore[operator]
    data = datasets.Dataset.from_dict({"text": [text[i : i + 60] for i in range(0, 240, 6)]})
    callback = FedqCallback("sft", amqp_url=amqp_url, namespace=namespace, local_steps=3)
    trainer = trl.SFTTrainer(
        model=tiny_llama(seed=0),
        args=training_args(tmp_path, trl.SFTConfig, max_length=64),
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=LoraConfig(**LORA),
        callbacks=[callback],
    )
    with aggregator(
        amqp_url, namespace, tmp_path / "adapter", tmp_path / "state", max_versions=2
    ) as state_dir:
        trainer.train()
        global_model = model_of(state_dir)
    assert trainer.state.global_step == 6
    local = {n.replace(".default", ""): t for n, t in trainer.model.state_dict().items() if "lora_" in n}
    assert set(local) == set(global_model)
    for name, tensor in global_model.items():
        assert torch.equal(local[name], tensor), name
    assert any(float(t.abs().max()) > 0 for n, t in global_model.items() if "lora_B" in n)


DDP_TRAINER = """
import torch, transformers
from fedq.hf import FedqCallback
from tests.hf_models import tiny_llama
from tests.test_hf_trainer import Pattern
args = transformers.TrainingArguments(output_dir=OUT, max_steps=4, per_device_train_batch_size=4,
    save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, ddp_backend="gloo")
transformers.Trainer(model=tiny_llama(0), args=args, train_dataset=Pattern(),
                     callbacks=[FedqCallback("ddp", amqp_url=URL)]).train()
"""


def test_a_trainer_on_several_processes_is_refused(amqp_url: str, tmp_path: Path) -> None:
    """torchrun with two processes (CPU, gloo): each would be a client sending the same update; both refuse
    at train begin, before connecting."""
    script = tmp_path / "ddp_trainer.py"
    script.write_text(f"OUT, URL = {str(tmp_path / 'out')!r}, {amqp_url!r}\n" + DDP_TRAINER)
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", str(script)],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode != 0
    refusals = [line for line in done.stderr.splitlines() if "runs in 2 (torchrun/DDP)" in line]
    assert {line.split("]")[0] for line in refusals} >= {"[rank0", "[rank1"}, done.stderr[-3000:]


class Crash(transformers.TrainerCallback):
    """The user's training fails after its first step (outside FedqCallback: on_train_end is not called)."""

    def on_step_end(
        self, args: object, state: transformers.TrainerState, control: object, **kwargs: object
    ) -> None:
        if state.global_step == 1:
            raise RuntimeError("the user's training failed")


def test_train_again_after_a_failure_outside_the_callback(
    amqp_url: str, namespace: str, tmp_path: Path
) -> None:
    """``trainer.train()`` again (a notebook's retry) with the same callback after the training failed between
    sends: the callback starts a fresh client, loads the newest version again and federates on. It reused the
    client left open, whose receive waited for a version newer than the one it held, which no aggregator made
    (this client's update was what it waited for): a StreamError after the callback's timeout."""
    with_lora(tiny_llama(seed=0)).save_pretrained(tmp_path / "adapter")  # type: ignore[operator]
    model = with_lora(tiny_llama(seed=0))
    callback = FedqCallback("retry", amqp_url=amqp_url, namespace=namespace, codec="fp32", timeout=15)
    crash = Crash()
    trainer = transformers.Trainer(
        model=model, args=training_args(tmp_path), train_dataset=Pattern(), callbacks=[callback, crash]
    )
    with aggregator(
        amqp_url,
        namespace,
        tmp_path / "adapter",
        tmp_path / "state",
        max_versions=2,
        client_config={"local_steps": 2},
    ) as state_dir:
        with pytest.raises(RuntimeError, match="the user's training failed"):
            trainer.train()
        trainer.remove_callback(crash)
        trainer.train()
        global_model = model_of(state_dir)
    assert callback.round is not None and callback.round.version == 2 and callback.round.final
    local = {n.replace(".default", ""): t for n, t in model.state_dict().items() if "lora_" in n}
    for name, tensor in global_model.items():
        assert torch.equal(local[name], tensor), name

"""A Hugging Face ``Trainer`` (or TRL's ``SFTTrainer``, a subclass) joins a federation with one callback.

    from fedq.hf import FedqCallback

    trainer = Trainer(model=model, args=args, train_dataset=data,                     # as before
                      callbacks=[FedqCallback("alice", amqp_url=URL, codec="nf4")])   # + this
    trainer.train()                                                                   # as before

The training logic (model, data, optimizer, schedule, logging, saving) stays the user's; the callback wraps
it in the three calls of ``fedq.Client``:

- **train begin**: connect, and load the newest global version into the model (in place, so the optimizer
  the Trainer built keeps its parameters);
- **every round**: after ``local_steps`` optimizer steps (the version's ``local_steps`` setting from
  ``fedq aggregator --config local_steps=N``, else the callback's), send the update (the delta against the
  received version, weighted by the samples trained on, with the last logged loss), then load the next
  version and go on training from it, optimizer state kept (as the demo's clients do);
- **the final version** (``--max-versions``): training stops (``should_training_stop``) with the final global
  model loaded, so what the Trainer saves at the end is the federation's model. A Trainer that joins after
  the end gets the final model too: it cannot help taking one step (it checks for a stop only after a step),
  and that step is undone at train end;
- **train end**: steps trained since the last send are sent as one more update (unless the federation
  ended), and the connection is closed.

PEFT: with ``trainable_only`` left at None, a model with frozen parameters (a ``PeftModel``: a frozen base
with adapters) sends only what trains, so only the adapters travel; the aggregator may hold the adapters alone
(``--init`` a PEFT adapter directory) or the whole model. Tied weights, ``.default`` adapter names and
compile/DDP wrappers are handled by ``fedq.binding``.

One process per client: a Trainer launched on several processes (torchrun, DDP) is refused at train begin.

Requires the ``hf`` extra (``pip install 'fedq[hf]'``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError as exc:  # the optional extra is missing: say which
    raise ImportError(f"fedq.hf needs transformers: pip install 'fedq[hf]' ({exc})") from exc

from fedq.client import DEFAULT_TIMEOUT, Client, Round
from fedq.errors import ConfigError

DEFAULT_LOCAL_STEPS = 50


class FedqCallback(TrainerCallback):
    """One federation member driven by a ``Trainer``'s steps (see the module docstring).

    ``label`` and ``client_options`` are ``fedq.Client``'s (``amqp_url``, ``namespace``, ``codec``, ...);
    ``trainable_only`` None means: only trainable tensors when the model has frozen ones.
    """

    def __init__(
        self,
        label: str,
        *,
        local_steps: int = DEFAULT_LOCAL_STEPS,
        trainable_only: bool | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        **client_options: Any,
    ) -> None:
        self.label = label
        self.default_local_steps = local_steps
        self.trainable_only = trainable_only
        self.timeout = timeout
        self.client_options = client_options
        self.client: Client | None = None
        self.round: Round | None = None
        self.steps = 0  # optimizer steps since the last version was loaded
        self.loss: float | None = None  # the last loss the Trainer logged

    @property
    def local_steps(self) -> int:
        """Optimizer steps per round: the aggregator's ``local_steps`` setting, else the callback's."""
        configured = self.round.config.get("local_steps") if self.round is not None else None
        return int(configured) if configured else self.default_local_steps

    def on_round(self, round: Round, model: torch.nn.Module) -> None:
        """Called after each version is loaded into ``model``; override to evaluate or report it."""

    # Trainer events -----------------------------------------------------------------------------------------
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if args.world_size > 1:
            raise ConfigError(
                "FedqCallback federates a Trainer that runs in one process; this one runs in "
                f"{args.world_size} (torchrun/DDP): each would join as a client of its own and send the same "
                "update, and each could load a different version. Run each federation client as a "
                "single-process Trainer"
            )
        model = kwargs["model"]
        # a client left open by a training run that failed outside the callback (the Trainer does not call
        # on_train_end then) holds a version the model has trained away from: its receive would wait for a
        # newer one, which a federation waiting for this client's update never makes. Start afresh.
        self.close()
        trainable_only = self.trainable_only
        if trainable_only is None:
            trainable_only = any(not p.requires_grad for p in model.parameters())
        self.client = Client(self.label, trainable_only=trainable_only, **self.client_options)
        self._closing_on_error(lambda: self._receive(model, control))

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if logs and "loss" in logs:
            self.loss = float(logs["loss"])

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.steps += 1
        if self.steps >= self.local_steps:
            self._closing_on_error(lambda: self._send(args, kwargs["model"]))
            self._closing_on_error(lambda: self._receive(kwargs["model"], control))

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.client is not None and self.steps:
            if self.client.final:  # joined after the end: the Trainer took its one step from the final model
                self._closing_on_error(lambda: self._restore(kwargs["model"]))
            else:
                self._closing_on_error(lambda: self._send(args, kwargs["model"]))
        self.close()

    def close(self) -> None:
        """Close the connection (done at the end of training, and when a call fails: the error then ends
        ``trainer.train()``, which does not call ``on_train_end``)."""
        if self.client is not None:
            self.client.close()
            self.client = None

    # the three calls ----------------------------------------------------------------------------------------
    def _closing_on_error(self, call: Callable[[], None]) -> None:
        try:
            call()
        except BaseException:
            self.close()
            raise

    def _receive(self, model: torch.nn.Module, control: TrainerControl) -> None:
        assert self.client is not None
        self.round = self.client.receive(model, timeout=self.timeout)
        self.client.check_sendable(model)  # a model the first send would refuse stops before training
        self.steps = 0
        self.on_round(self.round, model)
        if self.round.final:
            control.should_training_stop = True

    def _restore(self, model: torch.nn.Module) -> None:
        assert self.client is not None
        self.client.restore(model)
        self.steps = 0

    def _send(self, args: TrainingArguments, model: torch.nn.Module) -> None:
        assert self.client is not None
        samples = (
            args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)
        )
        metrics = {"loss": self.loss} if self.loss is not None else {}
        self.client.send(model, num_samples=self.steps * samples, metrics=metrics)
        self.steps = 0

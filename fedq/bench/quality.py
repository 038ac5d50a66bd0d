"""``fedq bench quality``: does a compressed update learn as well as a full-precision one, and at what cost?

One federation per setting, run in this process so that it is fast and exactly repeatable: four clients with
the same non-IID shards of tinyshakespeare (``play`` split), the same seeds and the same number of client
updates (FedAvg rounds: every client trains ``--local-steps`` steps from the global model, with its own
AdamW kept across rounds, then its delta travels). Each delta takes the client's real encoding path
(``fedq.client``'s lazy delta and codec policy, ``fedq.codecs.ErrorFeedback``,
``fedq.streaming.iter_container``: manifest, chunks, commit); the aggregator side decodes every message with
``fedq.wire`` and folds it with the FedAvg strategy's weights into an ``Accumulator``. ``wire_bytes`` counts
every message body byte of the updates (chunks, manifests, commits); the model download is the same for every
setting and is not counted. Centralized training on the pooled shards, for the same number of optimizer steps
of the same batch size, is the reference row.

The table in docs/benchmarks.md was made with ``fedq bench quality --threads 1 --json results/quality.json
--plot results/quality.png`` on a shared 2-core CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fedq import client as fedq_client
from fedq import wire
from fedq.aggregation.accumulator import Accumulator
from fedq.aggregation.strategies import Candidate, FedAvg
from fedq.bench import chosen
from fedq.codecs import ErrorFeedback
from fedq.protocol import UpdateMeta, update_stream
from fedq.streaming import iter_container
from workers import gpt, shakespeare

# (setting, codec, error feedback)
SETTINGS: list[tuple[str, str, bool]] = [
    ("fp32", "fp32", False),
    ("bf16", "bf16", False),
    ("int8", "int8", False),
    ("nf4", "nf4", False),
    ("nf4+ef", "nf4", True),
    ("fp4+ef", "fp4", True),
]
CENTRAL = "central"


@dataclass(frozen=True)
class Setup:
    clients: int
    rounds: int
    local_steps: int
    batch_size: int
    lr: float
    split: str
    seed: int
    n_embd: int
    n_layer: int
    block_size: int
    eval_batches: int


@dataclass
class Result:
    setting: str
    val_loss: float
    wire_bytes: int
    fp32_bytes: int
    seconds: float
    curve: list[tuple[int, float]]  # (cumulative wire bytes or optimizer steps, validation loss) per round


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    setup = Setup(
        clients=args.clients,
        rounds=args.rounds,
        local_steps=args.local_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        split=args.split,
        seed=args.seed,
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        block_size=args.block_size,
        eval_batches=args.eval_batches,
    )
    wanted = chosen("--settings", args.settings, [*(s for s, _, _ in SETTINGS), CENTRAL])
    results = []
    for setting, codec, feedback in SETTINGS:
        if setting in wanted:
            results.append(run_federated(setup, setting, codec, feedback))
            _print_row(results[-1], results)
    if CENTRAL in wanted:
        results.append(run_central(setup))
        _print_row(results[-1], results)
    if args.json:
        write_json(args.json, setup, results)
        print(f"wrote {args.json}")
    if args.plot:
        plot(args.plot, results)
        print(f"wrote {args.plot}")
    return 0


def run_federated(setup: Setup, setting: str, codec: str, feedback: bool) -> Result:
    """One federation of FedAvg rounds; returns the final validation loss and the update bytes it took."""
    start = time.monotonic()
    corpus, val = _data(setup)
    model = _model(setup, corpus.vocab.size)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    clients = [
        _LocalClient(setup, k, corpus.clients[k], model, codec, feedback) for k in range(setup.clients)
    ]
    strategy = FedAvg(min_clients=setup.clients, round_timeout=1.0)
    wire_bytes = fp32_bytes = 0
    curve = [(0, gpt.evaluate(model, val))]
    for version in range(setup.rounds):
        acc = Accumulator(shapes)
        weights = []
        for client in clients:
            weight = strategy.weight(_candidate(client.name, version, client.num_samples), staleness=0)
            for body in client.update(model, version):
                wire_bytes += len(body)
                fp32_bytes += _fold(acc, body, weight)
            weights.append(weight)
        scale = strategy.scale(weights)
        with torch.no_grad():
            for name, tensor in model.state_dict().items():
                tensor.add_(acc.pop(name), alpha=scale)
        curve.append((wire_bytes, gpt.evaluate(model, val)))
    return Result(setting, curve[-1][1], wire_bytes, fp32_bytes, time.monotonic() - start, curve)


def run_central(setup: Setup) -> Result:
    """The reference: one model on the pooled shards, as many optimizer steps of the same batch size."""
    start = time.monotonic()
    corpus, val = _data(setup)
    model = _model(setup, corpus.vocab.size)
    optimizer = gpt.make_optimizer(model, setup.lr)
    generator = torch.Generator().manual_seed(setup.seed + 1)
    steps_per_round = setup.clients * setup.local_steps
    curve = [(0, gpt.evaluate(model, val))]
    for round_ in range(setup.rounds):
        batches = shakespeare.sample_batches(
            corpus.pooled, steps_per_round, setup.batch_size, setup.block_size, generator
        )
        gpt.train_steps(model, optimizer, batches)
        curve.append(((round_ + 1) * steps_per_round, gpt.evaluate(model, val)))
    return Result(CENTRAL, curve[-1][1], 0, 0, time.monotonic() - start, curve)


class _LocalClient:
    """A client as the demo runs it (own model copy, optimizer, batches, error feedback), minus the broker."""

    def __init__(
        self,
        setup: Setup,
        index: int,
        tokens: torch.Tensor,
        model: gpt.GPT,
        codec: str,
        feedback: bool,
    ) -> None:
        self.setup = setup
        self.name = f"client{index}"
        self.tokens = tokens
        self.model = copy.deepcopy(model)
        self.optimizer = gpt.make_optimizer(self.model, setup.lr)
        self.generator = torch.Generator().manual_seed(setup.seed * 1000 + index + 2)
        self.codec_for = fedq_client.codec_policy(codec)
        self.feedback = ErrorFeedback() if feedback else None
        self.num_samples = setup.local_steps * setup.batch_size

    def update(self, global_model: gpt.GPT, version: int) -> Iterator[bytes]:
        """Train from the global model; the messages of the delta, encoded lazily as the caller reads them."""
        base = {k: v.detach().clone() for k, v in global_model.state_dict().items()}
        self.model.load_state_dict(base)
        batches = shakespeare.sample_batches(
            self.tokens, self.setup.local_steps, self.setup.batch_size, self.setup.block_size, self.generator
        )
        gpt.train_steps(self.model, self.optimizer, batches)
        update_id = uuid.uuid4().hex
        meta = UpdateMeta(update_id, version, self.num_samples, client=self.name)
        return iter_container(
            fedq_client.delta(fedq_client.tensors_of(self.model, trainable_only=False), base),
            stream=update_stream(self.name, update_id, 0),
            meta=meta.to_meta(),
            codec_for=self.codec_for,
            feedback=self.feedback,
        )


def _fold(acc: Accumulator, body: bytes, weight: float) -> int:
    """Decode one message as the aggregator would and fold a chunk; returns its fp32-equivalent bytes."""
    msg = wire.decode(body)
    if msg.kind != wire.CHUNK:
        return 0
    acc.fold(msg.name, msg.offset, wire.decode_tensor(msg), weight)
    return 4 * msg.count


def _candidate(client: str, version: int, num_samples: int) -> Candidate:
    return Candidate(
        update_id=f"{client}/{version}",
        client=client,
        base_version=version,
        num_samples=num_samples,
        norm=0.0,
        committed_at=0.0,
    )


def _data(setup: Setup) -> tuple[Any, list[tuple[torch.Tensor, torch.Tensor]]]:
    corpus = shakespeare.build_corpus(setup.clients, setup.split, setup.seed)
    val = shakespeare.validation_batches(corpus, setup.eval_batches, 64, setup.block_size, setup.seed)
    return corpus, val


def _model(setup: Setup, vocab_size: int) -> gpt.GPT:
    torch.manual_seed(setup.seed)
    cfg = gpt.GPTConfig(vocab_size, block_size=setup.block_size, n_layer=setup.n_layer, n_embd=setup.n_embd)
    return gpt.GPT(cfg)


def _print_row(result: Result, results: list[Result]) -> None:
    if len(results) == 1:
        print(
            f"{'setting':<8} {'val loss':>9} {'vs fp32':>8} {'wire MB':>9} {'bytes/fp32':>11} {'seconds':>8}"
        )
    fp32 = next((r for r in results if r.setting == "fp32"), None)
    rel_loss = f"{100 * (result.val_loss / fp32.val_loss - 1):+.2f}%" if fp32 else "-"
    rel_bytes = f"{result.wire_bytes / fp32.wire_bytes:.4f}" if fp32 and result.wire_bytes else "-"
    mb = f"{result.wire_bytes / 1e6:.2f}" if result.wire_bytes else "-"
    print(
        f"{result.setting:<8} {result.val_loss:>9.4f} {rel_loss:>8} {mb:>9} {rel_bytes:>11} "
        f"{result.seconds:>8.1f}"
    )


def write_json(path: Path, setup: Setup, results: list[Result]) -> None:
    fp32 = next((r for r in results if r.setting == "fp32"), None)
    rows = [
        {
            "setting": r.setting,
            "val_loss": r.val_loss,
            "wire_bytes": r.wire_bytes,
            "fp32_equivalent_bytes": r.fp32_bytes,
            "bytes_vs_fp32": r.wire_bytes / fp32.wire_bytes if fp32 and r.wire_bytes else None,
            "seconds": r.seconds,
            "curve": r.curve,
        }
        for r in results
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"setup": asdict(setup), "results": rows}, indent=1))


def plot(path: Path, results: list[Result]) -> None:
    """Validation loss against cumulative update bytes; centralized training is a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        if r.setting == CENTRAL:
            ax.axhline(r.val_loss, color="grey", linestyle="--", label=f"{CENTRAL} (final)")
        else:
            ax.plot(
                [b / 1e6 for b, _ in r.curve[1:]],
                [loss for _, loss in r.curve[1:]],
                marker=".",
                label=r.setting,
            )
    ax.set_xscale("log")
    ax.set_xlabel("cumulative update bytes on the wire (MB)")
    ax.set_ylabel("validation loss")
    ax.set_title("fedq bench quality: 4 non-IID clients, FedAvg")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)

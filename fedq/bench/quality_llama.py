"""``fedq bench quality --model llama``: a transformers Llama federated through the broker, both directions
compressed, against the same model trained centrally.

Each codec setting is one federation run as a user runs it: the aggregator is ``fedq aggregator`` in its own
process (FedAvg over every client's update, ``--max-versions`` rounds, versions published in the setting's
model codec), and the clients are ``fedq.Client``\\s in this process, each with its own
``LlamaForCausalLM``, AdamW kept across rounds and non-IID shard of tinyshakespeare (``play`` split:
contiguous runs of the text, so each client holds different plays). A round is the client loop of the
``fedq.client`` docstring: ``receive`` the newest version, train ``--local-steps`` steps, ``send`` the delta
in the setting's codec; the clients take their turns one after another (one thread: on a shared 2-core machine
parallel clients would only contend, and a fixed order keeps the run repeatable). The validation loss is
client 0's model just after each ``receive``: the global model as clients hold it (decoded from the model
codec). Centralized training, one model on the pooled shards for as many optimizer steps of the same batch
size as all the clients took together, is the reference row.

Bytes are what the clients counted: ``wire_bytes_up`` every update message body they published,
``wire_bytes_down`` every models-stream message they read, each against the float32 bytes of the same
tensors (``fp32_bytes_up``, ``fp32_bytes_down``: every version a client read, whole in float32). The clients
start from the initial weights, as sites holding the pretrained checkpoint do, so where version 0's values
are their own float32 values (``fp32``, and the deltas of ``int8`` and ``nf4``) they do not download it
(``fedq.initial_digest``): it then counts on neither side; a client that did download it (``bf16``: version
0 is the init's bf16 rounding) counts it on both.

The table in docs/benchmarks.md was made with ``fedq bench quality --model llama --threads 1 --json
fedq/docs/results/quality-llama.json --plot docs/quality-llama.png`` on the shared 2-core CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedq.bench import broker_url, chosen
from fedq.bench.aggregate import _wait_for
from fedq.bench.stream import delete_namespace
from fedq.client import Client
from fedq.errors import BenchError
from fedq.safetensors import save_file
from fedq.topology import Names
from workers import shakespeare
from workers.gpt import make_optimizer

CENTRAL = "central"


@dataclass(frozen=True)
class Setting:
    """One row: the clients' upload codec and error feedback, and the aggregator's model codec."""

    name: str
    codec: str
    error_feedback: bool
    model_codec: str


# The same codec both ways. Quantized versions are deltas against what clients hold, with the aggregator's
# error feedback built in (fedq aggregator --model-codec); the int8 row's uploads go without error feedback.
SETTINGS = [
    Setting("fp32", "fp32", False, "fp32"),
    Setting("bf16", "bf16", False, "bf16"),
    Setting("int8", "int8", False, "int8"),
    Setting("nf4+ef", "nf4", True, "nf4"),
]


@dataclass(frozen=True)
class Setup:
    clients: int
    rounds: int
    local_steps: int
    batch_size: int
    lr: float
    server_lr: float
    split: str
    seed: int
    hidden_size: int
    layers: int
    block_size: int
    eval_batches: int


@dataclass
class Row:
    setting: str
    val_loss: float
    wire_bytes_up: int
    wire_bytes_down: int
    fp32_bytes_up: int
    fp32_bytes_down: int
    params: int
    seconds: float
    curve: list[
        tuple[int, float]
    ]  # (cumulative wire bytes up + down, or optimizer steps; val loss) per round


def run(args: argparse.Namespace) -> int:
    url = broker_url(args.amqp_url)
    torch.set_num_threads(args.threads)
    logging.getLogger("pika").setLevel(logging.WARNING)
    setup = Setup(
        clients=args.clients,
        rounds=args.rounds,
        local_steps=args.local_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        server_lr=args.server_lr,
        split=args.split,
        seed=args.seed,
        hidden_size=args.n_embd,
        layers=args.n_layer,
        block_size=args.block_size,
        eval_batches=args.eval_batches,
    )
    wanted = chosen("--settings", args.settings, [*(s.name for s in SETTINGS), CENTRAL])
    rows: list[Row] = []
    for setting in SETTINGS:
        if setting.name in wanted:
            rows.append(run_federated(setup, setting, url, args.threads))
            _print_row(rows[-1], rows)
    if CENTRAL in wanted:
        rows.append(run_central(setup))
        _print_row(rows[-1], rows)
    if args.json:
        write_json(args.json, setup, rows)
        print(f"wrote {args.json}")
    if args.plot:
        plot(args.plot, setup, rows)
        print(f"wrote {args.plot}")
    return 0


def build_model(setup: Setup, vocab_size: int) -> nn.Module:
    """A ``LlamaForCausalLM`` from a config (Llama 3's shape ratios: grouped-query attention, SwiGLU MLP of
    about 2.75x the width, untied head), the same initial weights for every row."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(setup.seed)
    heads = max(1, setup.hidden_size // 32)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=setup.hidden_size,
        intermediate_size=_round_up(setup.hidden_size * 11 // 4, 32),
        num_hidden_layers=setup.layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=setup.block_size,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def run_federated(setup: Setup, setting: Setting, url: str, threads: int) -> Row:
    """One federation through the broker: an aggregator process, the clients' rounds, the bytes they moved."""
    start = time.monotonic()
    corpus, val = _data(setup)
    initial = build_model(setup, corpus.vocab.size)
    params = _num_parameters(initial)
    work = Path(tempfile.mkdtemp(prefix="fedq-bench-quality-"))
    names = Names(f"benchq{uuid.uuid4().hex[:10]}")
    init = save_file(initial.state_dict(), work / "init.safetensors")
    log = work / "aggregator.log"
    cmd = [
        *(sys.executable, "-m", "workers.aggregator", "--amqp-url", url, "--namespace", names.namespace),
        *("--strategy", "fedavg", "--min-clients", str(setup.clients), "--server-lr", str(setup.server_lr)),
        *("--max-versions", str(setup.rounds), "--init", str(init), "--state-dir", str(work / "state")),
        *("--threads", str(threads), "--model-codec", setting.model_codec),
    ]
    clients: list[Client] = []
    try:
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[2])
        _wait_for(log, "version 0 announced", proc)
        clients = [
            Client(
                f"c{k}",
                amqp_url=url,
                namespace=names.namespace,
                codec=setting.codec,
                error_feedback=setting.error_feedback,
            )
            for k in range(setup.clients)
        ]
        curve, fetched_v0 = _federate(setup, corpus, val, initial, clients)
        if proc.wait(timeout=120) != 0:
            raise BenchError(f"aggregator failed; see {log}")
    finally:
        for client in clients:
            client.close()
        if proc.poll() is None:
            proc.kill()
        delete_namespace(url, names)
    shutil.rmtree(work, ignore_errors=True)
    float_params = sum(t.numel() for t in initial.state_dict().values() if t.is_floating_point())
    return Row(
        setting=setting.name,
        val_loss=curve[-1][1],
        wire_bytes_up=sum(c.wire_bytes for c in clients),
        wire_bytes_down=sum(c.received_bytes for c in clients),
        fp32_bytes_up=sum(c.fp32_bytes for c in clients),
        fp32_bytes_down=4 * float_params * (setup.clients * setup.rounds + fetched_v0),
        params=params,
        seconds=time.monotonic() - start,
        curve=curve,
    )


def _federate(
    setup: Setup,
    corpus: shakespeare.Corpus,
    val: list[shakespeare.Batch],
    initial: nn.Module,
    clients: list[Client],
) -> tuple[list[tuple[int, float]], int]:
    """The clients' loop until the final version: the validation loss of each version received, and how
    many clients downloaded version 0 (the others held it already)."""
    models = [copy.deepcopy(initial) for _ in clients]
    optimizers = [make_optimizer(m, setup.lr) for m in models]
    generators = [torch.Generator().manual_seed(setup.seed * 1000 + k + 2) for k in range(len(clients))]
    final = False
    for client, model in zip(clients, models, strict=True):
        final = client.receive(model, timeout=600).final
    fetched_v0 = sum(1 for client in clients if client.received_bytes > 0)
    curve = [(_bytes_moved(clients), evaluate(models[0], val))]
    while not final:
        for k, (client, model) in enumerate(zip(clients, models, strict=True)):
            batches = shakespeare.sample_batches(
                corpus.clients[k], setup.local_steps, setup.batch_size, setup.block_size, generators[k]
            )
            loss = train_steps(model, optimizers[k], batches)
            client.send(model, num_samples=setup.local_steps * setup.batch_size, metrics={"loss": loss})
        for client, model in zip(clients, models, strict=True):
            final = client.receive(model, timeout=600).final
        curve.append((_bytes_moved(clients), evaluate(models[0], val)))
    return curve, fetched_v0


def run_central(setup: Setup) -> Row:
    """The reference: one model on the pooled shards, as many optimizer steps of the same batch size."""
    start = time.monotonic()
    corpus, val = _data(setup)
    model = build_model(setup, corpus.vocab.size)
    optimizer = make_optimizer(model, setup.lr)
    generator = torch.Generator().manual_seed(setup.seed + 1)
    steps_per_round = setup.clients * setup.local_steps
    curve = [(0, evaluate(model, val))]
    for round_ in range(setup.rounds):
        batches = shakespeare.sample_batches(
            corpus.pooled, steps_per_round, setup.batch_size, setup.block_size, generator
        )
        train_steps(model, optimizer, batches)
        curve.append(((round_ + 1) * steps_per_round, evaluate(model, val)))
    return Row(CENTRAL, curve[-1][1], 0, 0, 0, 0, _num_parameters(model), time.monotonic() - start, curve)


def train_steps(
    model: nn.Module, optimizer: torch.optim.Optimizer, batches: list[shakespeare.Batch]
) -> float:
    """One optimizer step per batch (gradients clipped to norm 1); the mean training loss."""
    model.train()
    total = 0.0
    for x, y in batches:
        loss = _loss(model, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        total += loss.item()
    return total / max(len(batches), 1)


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[shakespeare.Batch]) -> float:
    """Mean next-character loss over fixed batches: every model of a run is scored on the same text."""
    model.eval()
    return sum(float(_loss(model, x, y)) for x, y in batches) / len(batches)


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=x).logits
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _bytes_moved(clients: list[Client]) -> int:
    return sum(c.wire_bytes + c.received_bytes for c in clients)


def _data(setup: Setup) -> tuple[shakespeare.Corpus, list[shakespeare.Batch]]:
    corpus = shakespeare.build_corpus(setup.clients, setup.split, setup.seed)
    val = shakespeare.validation_batches(corpus, setup.eval_batches, 64, setup.block_size, setup.seed)
    return corpus, val


def _num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _print_row(row: Row, rows: list[Row]) -> None:
    if len(rows) == 1:
        print(
            f"{'setting':<8} {'val loss':>9} {'vs fp32':>8} {'up MB':>8} {'down MB':>8} {'up+down/fp32':>13} "
            f"{'seconds':>8}",
            flush=True,
        )
    fp32 = next((r for r in rows if r.setting == "fp32"), None)
    rel_loss = f"{100 * (row.val_loss / fp32.val_loss - 1):+.2f}%" if fp32 else "-"
    moved = row.wire_bytes_up + row.wire_bytes_down
    reference = row.fp32_bytes_up + row.fp32_bytes_down
    ratio = f"{moved / reference:.4f}" if reference else "-"
    up = f"{row.wire_bytes_up / 1e6:.2f}" if reference else "-"
    down = f"{row.wire_bytes_down / 1e6:.2f}" if reference else "-"
    print(
        f"{row.setting:<8} {row.val_loss:>9.4f} {rel_loss:>8} {up:>8} {down:>8} {ratio:>13} "
        f"{row.seconds:>8.1f}",
        flush=True,
    )


def write_json(path: Path, setup: Setup, rows: list[Row]) -> None:
    out: dict[str, Any] = {"model": "llama", "setup": asdict(setup), "results": [asdict(r) for r in rows]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))


def plot(path: Path, setup: Setup, rows: list[Row]) -> None:
    """Validation loss against cumulative bytes (up + down) per setting; centralized training's final loss
    is a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if r.setting == CENTRAL:
            ax.axhline(r.val_loss, color="grey", linestyle="--", label=f"{CENTRAL} (final)")
        else:
            ax.plot([b / 1e6 for b, _ in r.curve], [loss for _, loss in r.curve], marker=".", label=r.setting)
    ax.set_xscale("log")
    ax.set_xlabel("cumulative bytes on the wire, up + down, all clients (MB)")
    ax.set_ylabel("validation loss")
    params = rows[0].params / 1e6 if rows else 0
    ax.set_title(
        f"fedq bench quality --model llama: {params:.1f} M parameters, {setup.clients} non-IID clients"
    )
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)

"""``fedq bench robust``: validation loss of each aggregation rule under Byzantine attacks, and a DP table.

Each run is a real federation in one process: the aggregator service (``Aggregator``, the real staging, plan
and fold code) in a thread, and the demo's clients (``fedq.Client``, the demo GPT on tinyshakespeare) driven
one after the other, connected through fedq's in-memory transport instead of RabbitMQ. The broker is left out
on purpose: on a 2-core machine ~30 runs of 20 versions through RabbitMQ would take far longer than the
~15 minutes this bench may take, and the broker plays no part in what is measured here (the combining rule).

FedAvg rounds of 8 updates (the 8 clients, each on its own IID share of the text), fp32 updates. Of the 8,
``--attackers`` are Byzantine from the first version on. They know the honest updates of the version
(omniscient, the usual threat model) and send:

- ``signflip``: their own honest update times −10;
- ``noise``: Gaussian noise with 10× the RMS of the honest updates, per tensor;
- ``alie`` ("a little is enough", Baruch et al. 2019): μ − z σ of the honest updates, coordinate-wise, with
  the paper's z = Φ⁻¹((n − s) / n), s = ⌊n/2 + 1⌋ − f;
- ``ipm`` (inner-product manipulation, Xie et al. 2020): −ε μ with ε = 0.5 (pulls the mean's direction
  against the honest one while staying close to zero).

``none`` is the run in which all 8 clients are honest. The loss reported is the final global model's on fixed
held-out batches. The DP table runs FedAvg with central DP (clip ``--dp-clip``, population 8·``--dp-scale``)
at several noise multipliers with no attacker, and reports ε at δ = 1e-5 next to the loss.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import NormalDist
from typing import Any

import torch

from fedq.aggregation.privacy import DpConfig
from fedq.aggregation.server_opt import ServerOptConfig
from fedq.aggregation.service import Aggregator, Settings
from fedq.aggregation.strategies import FedAvg
from fedq.bench import chosen
from fedq.cli.aggregation_rules import rule_named
from fedq.client import Client
from fedq.safetensors import save_file
from fedq.topology import Names
from fedq.transport import connect
from workers import gpt, shakespeare

log = logging.getLogger(__name__)

STRATEGIES = {
    "fedavg": {},
    "median": {"rule": "median"},
    "trimmed-mean": {"rule": "trimmed-mean"},
    "krum": {"rule": "krum"},
    "multi-krum": {"rule": "multi-krum"},
    "centered-clipping": {"rule": "centered-clipping"},
    "fedavgm": {"server_opt": "avgm"},
    "fedadam": {"server_opt": "adam"},
}
ATTACKS = ("none", "signflip", "noise", "alie", "ipm")

Delta = dict[str, torch.Tensor]


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    logging.getLogger("fedq").setLevel(logging.WARNING)  # a line per version and update otherwise
    strategies = chosen("--strategies", args.strategies, list(STRATEGIES))
    attacks = chosen("--attacks", args.attacks, ATTACKS)
    rows: list[dict[str, Any]] = []
    print(f"{'strategy':<18} {'attack':<9} {'val loss':>8} {'vs honest':>9} {'seconds':>7}", flush=True)
    honest = None
    for strategy in strategies:
        for attack in attacks:
            started = time.monotonic()
            loss = _federation(args, STRATEGIES[strategy], attack, None)
            honest = loss if (strategy, attack) == ("fedavg", "none") else honest
            row = {"strategy": strategy, "attack": attack, "val_loss": loss}
            rows.append(row)
            ratio = f"{loss / honest:8.3f}x" if honest else f"{'':>9}"
            print(
                f"{strategy:<18} {attack:<9} {loss:8.4f} {ratio} {time.monotonic() - started:7.1f}",
                flush=True,
            )
    dp_rows = []
    if args.dp_noise:
        print(
            f"\n{'dp noise':>8} {'epsilon':>8} {'val loss':>8}  (delta 1e-5, fedavg, no attack)", flush=True
        )
        for z in args.dp_noise:
            epsilon: list[float] = []
            loss = _federation(args, {}, "none", z, epsilon)
            dp_rows.append({"noise_multiplier": z, "epsilon": epsilon[-1], "delta": 1e-5, "val_loss": loss})
            print(f"{z:8.2f} {epsilon[-1]:8.2f} {loss:8.4f}", flush=True)
    if args.json:
        settings = {k: v for k, v in vars(args).items() if isinstance(v, int | float | str | list)}
        Path(args.json).write_text(json.dumps({"rows": rows, "dp": dp_rows, "settings": settings}, indent=1))
        print(f"results: {args.json}")
    return 0


def _federation(
    args: argparse.Namespace,
    options: dict[str, str],
    attack: str,
    dp_noise: float | None,
    epsilon_out: list[float] | None = None,
) -> float:
    """One federation of ``args.versions`` versions; the final global model's validation loss."""
    n = args.clients
    corpus = shakespeare.build_corpus(n, "iid", args.seed)
    config = gpt.GPTConfig(
        corpus.vocab.size, block_size=args.block_size, n_layer=args.n_layer, n_head=4, n_embd=args.n_embd
    )
    torch.manual_seed(args.seed)
    init = gpt.GPT(config)
    held_out = shakespeare.validation_batches(corpus, args.eval_batches, args.batch_size, args.block_size, 0)
    broker, names = f"robust-{uuid.uuid4().hex[:8]}", Names(f"r{uuid.uuid4().hex[:8]}")
    with tempfile.TemporaryDirectory(prefix="fedq-bench-robust-") as tmp:
        init_path = save_file(
            {k: v.detach() for k, v in init.state_dict().items()}, Path(tmp) / "init.safetensors"
        )
        settings = _settings(args, names, init_path, Path(tmp) / "state", options, dp_noise)
        with connect(f"memory://setup@{broker}") as t:
            t.declare(names, 1)
        stop = threading.Event()
        errors: list[BaseException] = []

        def aggregate() -> None:
            try:
                with connect(f"memory://aggregator@{broker}") as transport:
                    aggregator = Aggregator(transport, settings)
                    aggregator.run(stop)
                    privacy = aggregator.leader.planner.privacy if aggregator.leader else None
                    if privacy is not None and epsilon_out is not None:
                        epsilon_out.append(privacy.spent)
            except BaseException as exc:
                errors.append(exc)

        worker = threading.Thread(target=aggregate, daemon=True)
        worker.start()
        attackers = 0 if attack == "none" else args.attackers
        try:
            model = _train(args, broker, names, corpus, config, attack, attackers, errors)
        finally:
            stop.set()
            worker.join(60)
        if errors:
            raise errors[0]
        return gpt.evaluate(model, held_out)


def _settings(
    args: argparse.Namespace,
    names: Names,
    init: Path,
    state_dir: Path,
    options: dict[str, str],
    dp_noise: float | None,
) -> Settings:
    rule = rule_named(options.get("rule", "mean"), args)
    server_opt = ServerOptConfig(options["server_opt"]) if "server_opt" in options else None
    privacy = (
        DpConfig(noise_multiplier=dp_noise, clip=args.dp_clip, population=args.clients * args.dp_scale)
        if dp_noise
        else None
    )
    return Settings(
        names=names,
        strategy=FedAvg(min_clients=args.clients, round_timeout=3600),
        init=init,
        state_dir=state_dir,
        max_staleness=0,
        device=torch.device("cpu"),
        max_versions=args.versions,
        fold_threads=1,
        rule=rule,
        server_opt=server_opt,
        privacy=privacy,
        dp_seed=args.seed,
    )


def _train(
    args: argparse.Namespace,
    broker: str,
    names: Names,
    corpus: shakespeare.Corpus,
    config: gpt.GPTConfig,
    attack: str,
    attackers: int,
    errors: list[BaseException],
) -> gpt.GPT:
    """Drive the clients version by version; returns a model holding the last global version."""
    n = args.clients
    models = [gpt.GPT(config) for _ in range(n)]
    optimizers = [gpt.make_optimizer(m, args.lr) for m in models]
    generators = [torch.Generator().manual_seed(args.seed * 1000 + i) for i in range(n)]
    noise = torch.Generator().manual_seed(args.seed + 99)
    clients = [
        Client(f"c{i}", amqp_url=f"memory://c{i}@{broker}", namespace=names.namespace, codec="fp32")
        for i in range(n)
    ]
    # receives in parallel: each waits for a quiet spell on the versions stream, one after the other would
    # add those up
    pool = ThreadPoolExecutor(n)
    try:
        for _ in range(args.versions):
            if errors:
                raise errors[0]
            list(pool.map(lambda i: clients[i].receive(models[i], timeout=120), range(n)))
            bases, deltas = [], []
            for i in range(n):
                base = {k: v.detach().clone() for k, v in models[i].state_dict().items()}
                batches = shakespeare.sample_batches(
                    corpus.clients[i], args.local_steps, args.batch_size, args.block_size, generators[i]
                )
                gpt.train_steps(models[i], optimizers[i], batches)
                bases.append(base)
                deltas.append({k: v.detach() - base[k] for k, v in models[i].state_dict().items()})
            crafted = (
                ATTACK_FNS[attack](deltas[attackers:], deltas[:attackers], n, noise) if attackers else []
            )
            for i in range(n):
                if i < attackers:
                    models[i].load_state_dict({k: bases[i][k] + crafted[i][k] for k in bases[i]})
                clients[i].send(models[i], num_samples=args.local_steps * args.batch_size)
        final = gpt.GPT(config)
        clients[0].receive(final, timeout=120)
        return final
    finally:
        pool.shutdown()
        for client in clients:
            client.close()


def _stack(deltas: list[Delta], name: str) -> torch.Tensor:
    return torch.stack([d[name] for d in deltas])


def _signflip(honest: list[Delta], own: list[Delta], n: int, g: torch.Generator) -> list[Delta]:
    return [{k: -10.0 * v for k, v in d.items()} for d in own]


def _noise(honest: list[Delta], own: list[Delta], n: int, g: torch.Generator) -> list[Delta]:
    rms = {k: float(_stack(honest, k).pow(2).mean().sqrt()) for k in honest[0]}
    return [{k: 10.0 * rms[k] * torch.randn(v.shape, generator=g) for k, v in d.items()} for d in own]


def _alie(honest: list[Delta], own: list[Delta], n: int, g: torch.Generator) -> list[Delta]:
    f = len(own)
    s = n // 2 + 1 - f
    z = NormalDist().inv_cdf((n - s) / n)
    shift = {k: _stack(honest, k).mean(0) - z * _stack(honest, k).std(0) for k in honest[0]}
    return [dict(shift) for _ in own]


def _ipm(honest: list[Delta], own: list[Delta], n: int, g: torch.Generator) -> list[Delta]:
    mean = {k: -0.5 * _stack(honest, k).mean(0) for k in honest[0]}
    return [dict(mean) for _ in own]


ATTACK_FNS: dict[str, Callable[[list[Delta], list[Delta], int, torch.Generator], list[Delta]]] = {
    "signflip": _signflip,
    "noise": _noise,
    "alie": _alie,
    "ipm": _ipm,
}

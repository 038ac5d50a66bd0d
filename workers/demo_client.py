"""``fedq client``: the demo client, a small GPT trained on this client's shard of tinyshakespeare.

It is an ordinary training loop with the three fedq calls added: ``receive`` the newest global model, train
``local_steps`` steps (the server's setting, sent with each version) with the client's own AdamW, whose state
stays with the client across rounds, and ``send`` the delta with the mean training loss. It stops after
receiving version ``--until-version``, or when stopped (SIGTERM/SIGINT end it between two calls).

With ``--metrics-file`` it writes its final metrics page there as it ends: the launcher's table reads a
client's last counts from it (the bytes of the updates that made the last version), since the client's
metrics endpoint is gone by the time the launcher has scored that version.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import types
from pathlib import Path

import torch

from fedq import metrics
from fedq.cli import main as fedq_main
from fedq.client import Client
from workers import gpt, shakespeare

log = logging.getLogger("fedq.demo_client")


def initial_model(args: argparse.Namespace, vocab_size: int) -> gpt.GPT:
    """Version 0, seeded as ``workers.demo_init`` writes it, so that a client's first receive finds it holds
    version 0 and does not download it; unseeded, every client downloaded it (walk of 2026-11-29)."""
    torch.manual_seed(args.seed)
    return gpt.GPT(model_config(args, vocab_size))


def model_config(args: argparse.Namespace, vocab_size: int) -> gpt.GPTConfig:
    return gpt.GPTConfig(
        vocab_size, block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd
    )


def run(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _stop)
    torch.set_num_threads(args.threads)
    metrics.serve(args.metrics_port, args.namespace)
    corpus = shakespeare.build_corpus(args.clients, args.split, args.seed)
    tokens = corpus.clients[args.index]
    model = initial_model(args, corpus.vocab.size)
    optimizer = gpt.make_optimizer(model, args.lr)
    generator = torch.Generator().manual_seed(args.seed * 1000 + args.index + 2)
    held_out = shakespeare.validation_batches(
        corpus, args.eval_batches, args.batch_size, args.block_size, args.seed
    )
    try:
        with Client(
            args.name,
            amqp_url=args.amqp_url,
            namespace=args.namespace,
            codec=args.codec,
            error_feedback=args.error_feedback,
        ) as client:
            while True:
                round_ = client.receive(model)
                if round_.final or (args.until_version and round_.version >= args.until_version):
                    log.info("%s: received version %d, done", args.name, round_.version)
                    return 0
                if held_out:  # federated evaluation: every client scores the global model it received
                    metrics.VALIDATION_LOSS.labels("client").set(gpt.evaluate(model, held_out))
                steps = int(round_.config.get("local_steps", args.local_steps))
                batches = shakespeare.sample_batches(
                    tokens, steps, args.batch_size, args.block_size, generator
                )
                loss = gpt.train_steps(model, optimizer, batches)
                sent = client.send(model, num_samples=steps * args.batch_size, metrics={"loss": loss})
                log.info(
                    "%s: v%d + %d steps, loss %.3f, sent %.2f MB",
                    args.name, round_.version, steps, loss, sent.wire_bytes / 1e6,
                )  # fmt: skip
    except KeyboardInterrupt:
        log.info("%s: stopped", args.name)
        return 0
    finally:
        if args.metrics_file is not None:
            write_metrics(args.metrics_file)


def write_metrics(path: Path) -> None:
    """This process's metrics page (Prometheus text, as its endpoint serves it) into ``path``, whole or not
    at all: a reader never sees half a page."""
    from prometheus_client import generate_latest

    part = path.with_name(path.name + ".part")
    part.write_bytes(generate_latest())
    os.replace(part, path)


def _stop(signum: int, frame: types.FrameType | None) -> None:
    """SIGTERM ends the loop the way Ctrl-C does, so the connection is closed on the way out."""
    raise KeyboardInterrupt


if __name__ == "__main__":  # python -m workers.demo_client ARGS is fedq client ARGS
    sys.exit(fedq_main(["client", *sys.argv[1:]]))

"""``fedq client``: the demo client, a small GPT trained on this client's shard of tinyshakespeare.

It is an ordinary training loop with the three fedq calls added: ``receive`` the newest global model, train
``local_steps`` steps (the server's setting, sent with each version) with the client's own AdamW, whose state
stays with the client across rounds, and ``send`` the delta with the mean training loss. It stops after
receiving version ``--until-version``, or when stopped (SIGTERM/SIGINT end it between two calls).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import types

import torch

from fedq import metrics
from fedq.cli import standalone
from fedq.client import Client
from fedq.topology import DEFAULT_NAMESPACE
from fedq.transport import default_url
from workers import gpt, shakespeare

log = logging.getLogger("fedq.demo_client")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Model and data options that every process of a run must agree on (the launcher passes them through)."""
    a = parser.add_argument
    a("--clients", type=int, default=4, help="number of clients the text is split between")
    a("--split", choices=shakespeare.SPLITS, default="play", help="how the text is split between clients")
    a("--seed", type=int, default=0, help="seed of the split, the initial model and the batches")
    a("--n-embd", type=int, default=160, help="model width")
    a("--n-layer", type=int, default=4, help="transformer blocks")
    a("--n-head", type=int, default=4, help="attention heads")
    a("--block-size", type=int, default=64, help="context length in characters")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--name", default="client0", help="client name (the broker user when per-client users are set up)")
    a("--index", type=int, default=0, help="which shard of the text this client trains on (0 .. clients-1)")
    a("--amqp-url", default=default_url(), help="broker URL (FEDQ_AMQP_URL)")
    a("--namespace", default=DEFAULT_NAMESPACE, help="prefix of every exchange and queue of the federation")
    a("--codec", default="nf4", help="update codec: fp32, fp16, bf16, int8, nf4, fp4")
    a(
        "--error-feedback",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="carry quantization error into the next update (default: on below 16 bits)",
    )
    a("--local-steps", type=int, default=10, help="steps per update unless the server sends local_steps")
    a("--batch-size", type=int, default=32, help="sequences per step")
    a("--lr", type=float, default=3e-3, help="AdamW learning rate")
    a(
        "--until-version",
        type=int,
        default=0,
        help="stop after receiving this version (0 = run until stopped)",
    )
    a(
        "--eval-batches",
        type=int,
        default=1,
        help="held-out batches on which each received global model is scored (0 = none)",
    )
    a("--threads", type=int, default=1, help="torch CPU threads")
    a("--metrics-port", type=int, default=0, help="serve Prometheus metrics on this port (0 = off)")
    add_model_arguments(parser)


def model_config(args: argparse.Namespace, vocab_size: int) -> gpt.GPTConfig:
    return gpt.GPTConfig(
        vocab_size, block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd
    )


def run(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _stop)
    torch.set_num_threads(args.threads)
    metrics.serve(args.metrics_port)
    corpus = shakespeare.build_corpus(args.clients, args.split, args.seed)
    tokens = corpus.clients[args.index]
    model = gpt.GPT(model_config(args, corpus.vocab.size))
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
                if args.until_version and round_.version >= args.until_version:
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


def _stop(signum: int, frame: types.FrameType | None) -> None:
    """SIGTERM ends the loop the way Ctrl-C does, so the connection is closed on the way out."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    return standalone("python -m workers.demo_client", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())

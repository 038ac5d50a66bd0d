"""Write the demo's version 0: ``python -m workers.demo_init OUT [--n-embd ...]`` saves the small GPT that
``fedq client`` trains (same model options, same seed) as a safetensors file for ``fedq aggregator --init``.

The demo launcher makes this file itself; a deployment of separate worker processes (workers/compose.yml,
workers/systemd/) runs this once instead. An existing OUT is kept: a restarted deployment must not change the
initial model under aggregators that already hold versions of it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedq.cli.client import add_model_arguments
from fedq.safetensors import save_file
from workers import shakespeare
from workers.demo_client import initial_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.demo_init", description=__doc__)
    parser.add_argument("out", type=Path, help="the safetensors file to write")
    add_model_arguments(parser)
    args = parser.parse_args(argv)
    if args.out.exists():
        print(f"{args.out} exists; kept")
        return 0
    vocab = shakespeare.build_corpus(args.clients, args.split, args.seed).vocab
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(initial_model(args, vocab.size).state_dict(), args.out)
    print(f"wrote the demo's version 0 to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Validation loss of each aggregation rule under Byzantine attacks, and ε vs loss under central DP
(fedq/bench/robust.py)."""

from __future__ import annotations

import argparse

from fedq.cli.aggregation_rules import add_rule_parameters
from fedq.cli.options import numbers


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a(
        "--strategies",
        default="fedavg,median,trimmed-mean,krum,multi-krum,centered-clipping",
        help="rules to run",
    )
    a("--attacks", default="none,signflip,noise,alie,ipm", help="attacks to run (none = all clients honest)")
    a("--clients", type=int, default=8, help="clients, each on its own IID share of the text")
    a("--attackers", type=int, default=2, help="Byzantine clients among them")
    a("--versions", type=int, default=15, help="versions per run")
    a("--local-steps", type=int, default=4, help="client steps per version")
    a("--batch-size", type=int, default=16, help="sequences per step")
    a("--block-size", type=int, default=32, help="context length in characters")
    a("--n-embd", type=int, default=64, help="model width (the demo GPT, smaller: 2 shared cores)")
    a("--n-layer", type=int, default=2, help="transformer blocks")
    a("--lr", type=float, default=3e-3, help="client AdamW learning rate")
    a("--eval-batches", type=int, default=8, help="held-out batches scoring the final model")
    a("--seed", type=int, default=0, help="seed of the model, the data and the attacks")
    a(
        "--dp-noise",
        type=numbers,
        default="0.5,1,2",
        help="noise multipliers of the DP table (empty = no table)",
    )
    a("--dp-clip", type=float, default=0.5, help="DP clip of each update's L2 norm")
    a("--dp-scale", type=int, default=100, help="DP population = clients x this (sampling rate 1 / this)")
    a("--json", default=None, help="write the rows as JSON to this path")
    add_rule_parameters(parser.add_argument_group("the rules' parameters (as fedq aggregator's)"))
    # Krum's f = the attackers by default; trimmed mean drops 2 of 8 at each end
    parser.set_defaults(byzantine=2, trim=0.25)


def run(args: argparse.Namespace) -> int:
    from fedq.bench import robust

    return robust.run(args)

"""The aggregator's options beyond the strategy's weighted mean: robust rule, server optimizer, central DP.

``--strategy`` says when a version is made and how its updates are weighted (fedavg, fedbuff, fedasync);
``--rule`` says how the version's updates are combined, and works with each of them; ``--server-opt`` turns
the combined step into an optimizer's step; ``--dp-noise`` adds central differential privacy. See
docs/aggregation.md for what each costs and guarantees.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from fedq.cli.options import size

if TYPE_CHECKING:
    from fedq.aggregation.privacy import DpConfig
    from fedq.aggregation.robust import Rule
    from fedq.aggregation.server_opt import ServerOptConfig

RULES = ("mean", "median", "trimmed-mean", "krum", "multi-krum", "centered-clipping")
SERVER_OPTS = ("none", "avgm", "adam", "yogi", "adagrad")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    rules = parser.add_argument_group("aggregation rule (how a version's updates are combined)")
    rules.add_argument(
        "--rule",
        choices=RULES,
        default="mean",
        help="mean: the strategy's weighted mean; median / trimmed-mean: coordinate-wise; krum / multi-krum: "
        "the update(s) nearest the others; centered-clipping: iterative clipping around the centre",
    )
    add_rule_parameters(rules)
    rules.add_argument(
        "--robust-memory",
        type=size,
        default="256MiB",
        help="median / trimmed-mean / krum / centered-clipping: bytes of decoded update rows per fold thread",
    )
    opts = parser.add_argument_group("server optimizer (Reddi et al. 2021)")
    o = opts.add_argument
    o("--server-opt", choices=SERVER_OPTS, default="none", help="optimizer over each version's step")
    o(
        "--server-opt-lr",
        type=float,
        default=0.0,
        help="its learning rate (default 0: 1.0 for avgm, 0.01 for adam / yogi / adagrad)",
    )
    o("--server-beta1", type=float, default=0.9, help="momentum (all of them)")
    o("--server-beta2", type=float, default=0.99, help="second-moment decay (adam, yogi)")
    o("--server-tau", type=float, default=1e-3, help="adaptivity (adam, yogi, adagrad)")
    dp = parser.add_argument_group("central differential privacy (per-client, DP-FedAvg)")
    d = dp.add_argument
    d("--dp-noise", type=float, default=0.0, help="noise multiplier z (0 = no DP)")
    d("--dp-clip", type=float, default=1.0, help="L2 clip of each update (initial value when adaptive)")
    d("--dp-quantile", type=float, default=0.0, help="adaptive clip: target quantile of norms (0 = fixed)")
    d("--dp-clip-lr", type=float, default=0.2, help="adaptive clip: learning rate")
    d("--dp-count-std", type=float, default=0.0, help="adaptive clip: noise of the count (0 = K / 20)")
    d(
        "--dp-population",
        type=int,
        default=0,
        help="clients that may take part (sampling rate K / this); required with --dp-noise",
    )
    d("--dp-delta", type=float, default=1e-5, help="delta of the reported epsilon")
    d("--dp-budget", type=float, default=0.0, help="stop before epsilon would exceed this (0 = no budget)")
    d(
        "--dp-seed",
        type=int,
        default=None,
        help="seed of the noise (default: drawn at the first start and kept in the leader's checkpoint)",
    )


def add_rule_parameters(group: argparse._ActionsContainer) -> None:
    """The rules' parameters, for every command that runs a rule (``fedq aggregator``, ``fedq bench robust``):
    defined once, so that their meaning and defaults agree everywhere."""
    r = group.add_argument
    r("--trim", type=float, default=0.2, help="trimmed-mean: fraction dropped at each end of each coordinate")
    r(
        "--byzantine",
        type=int,
        default=1,
        help="krum / multi-krum: Byzantine updates tolerated per version (f)",
    )
    r("--krum-select", type=int, default=0, help="multi-krum: updates averaged (0 = K - f)")
    r("--cc-radius", type=float, default=0.0, help="centered-clipping: radius (0 = the median update norm)")
    r("--cc-iterations", type=int, default=3, help="centered-clipping: iterations")


def rule_named(name: str, args: argparse.Namespace) -> Rule | None:
    """Rule ``name`` with the parameters of ``add_rule_parameters`` (None for the plain mean)."""
    from fedq.aggregation.robust import make_rule

    return make_rule(
        name,
        trim=args.trim,
        byzantine=args.byzantine,
        krum_select=args.krum_select,
        cc_radius=args.cc_radius,
        cc_iterations=args.cc_iterations,
    )


def rule_from(args: argparse.Namespace) -> Rule | None:
    from fedq.aggregation.robust import Krum

    rule = rule_named(args.rule, args)
    if isinstance(rule, Krum):
        # the updates per version the strategy aims at: Krum must be able to work with them
        rule.require(_updates_per_version(args))
    return rule


def server_opt_from(args: argparse.Namespace) -> ServerOptConfig | None:
    from fedq.aggregation.server_opt import ServerOptConfig

    if args.server_opt == "none":
        return None
    return ServerOptConfig(
        args.server_opt, args.server_opt_lr, args.server_beta1, args.server_beta2, args.server_tau
    )


def privacy_from(args: argparse.Namespace) -> DpConfig | None:
    from fedq.aggregation.privacy import DpConfig, Privacy
    from fedq.errors import ConfigError

    if not args.dp_noise:
        return None
    if args.dp_population < 1:
        raise ConfigError("--dp-noise needs --dp-population: how many clients may take part")
    if args.rule != "mean":
        raise ConfigError("--dp-noise works with --rule mean only (its noise is calibrated to the mean)")
    if args.norm_bound:
        raise ConfigError("--dp-noise clips every update to --dp-clip: leave --norm-bound at 0")
    config = DpConfig(
        noise_multiplier=args.dp_noise,
        clip=args.dp_clip,
        population=args.dp_population,
        delta=args.dp_delta,
        epsilon_budget=args.dp_budget,
        target_quantile=args.dp_quantile,
        clip_lr=args.dp_clip_lr,
        count_std=args.dp_count_std,
    )
    k = _updates_per_version(args)
    if config.epsilon_budget and Privacy(config, 0).epsilon_after(k) > config.epsilon_budget:
        raise ConfigError(
            f"--dp-budget {config.epsilon_budget:g} does not allow a single version of {k} updates out of "
            f"--dp-population {config.population} at --dp-noise {config.noise_multiplier:g}: raise the "
            "budget, the noise or the population"
        )
    return config


def _updates_per_version(args: argparse.Namespace) -> int:
    """The updates per version the strategy aims at (FedAvg may step with fewer after its timeout)."""
    return {"fedavg": args.min_clients, "fedbuff": args.buffer_size}.get(args.strategy, 1)


def settings_from(args: argparse.Namespace) -> dict[str, Any]:
    """The ``Settings`` fields these options set."""
    return {
        "rule": rule_from(args),
        "robust_memory": args.robust_memory,
        "server_opt": server_opt_from(args),
        "privacy": privacy_from(args),
        "dp_seed": args.dp_seed,
    }

"""Assemble a model version from the aggregator shards' state directories into one safetensors file, with
metadata: the version, the aggregation, and who contributed (validated broker users, update ids, weights,
staleness). Hugging Face and safetensors load it as it is."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, help="the safetensors file to write")
    parser.add_argument(
        "--state-dir",
        type=Path,
        action="append",
        default=[],
        help="an aggregator's --state-dir, or one shard's directory in it; repeat for shards kept elsewhere "
        "(default: fedq-state)",
    )
    parser.add_argument(
        "--version",
        type=int,
        default=None,
        help="the version to export (default: the newest all shards hold)",
    )


def run(args: argparse.Namespace) -> int:
    import json

    from fedq.cli.options import check_writable
    from fedq.results import export

    check_writable(args.out)
    meta = export(args.state_dir or [Path("fedq-state")], args.out, args.version)
    contributors = json.loads(meta["fedq.contributors"])
    print(
        f"exported version {meta['fedq.version']} ({meta['fedq.shards']} shards, {len(contributors)} "
        f"contributing updates) to {args.out}"
    )
    return 0

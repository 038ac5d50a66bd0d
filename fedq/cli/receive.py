"""Receive the newest complete model version (every shard's part) into one safetensors file, with its
version and contributors in the metadata; or, with --stream or --offset, one stream as it comes.

The file appears only when it is complete; the model is never held in memory. Where versions travel as deltas
(``fedq aggregator --model-codec int8/nf4``) the file holds, in float32, what every client holds (x̂,
``fedq.reconstruction``): rebuilt on disk from the newest snapshot and the deltas since, as a client does.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedq.cli.send import add_common_arguments
from fedq.topology import DEFAULT_TIMEOUT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, help="the safetensors file to write (appears only when complete)")
    parser.add_argument(
        "--stream", default=None, help="one stream id to take (default: the newest announced version)"
    )
    parser.add_argument(
        "--offset",
        choices=["first", "last", "next"],
        default=None,
        help="take the first stream that starts from this point of the models stream (the oldest retained "
        "message, the last one, or new ones) instead of the newest announced version",
    )
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds of silence before giving up"
    )
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from fedq.cli.options import check_writable
    from fedq.cli.progress import add_to_total, byte_bar
    from fedq.results import newest_announcement, receive_version
    from fedq.streaming import flow_for_budget, receive_file
    from fedq.topology import Names
    from fedq.transport import connect

    check_writable(args.out)
    flow = flow_for_budget(args.memory_budget, args.chunk_bytes)
    names = Names(args.namespace)
    options = {"timeout": args.timeout, "memory_budget": args.memory_budget, "prefetch": flow.prefetch}
    with connect(args.amqp_url, connect_timeout=0) as transport:
        if args.stream is None and args.offset is None:
            announcement = newest_announcement(transport, names, args.timeout)
            with byte_bar(f"receive v{announcement.version}", quiet=args.quiet) as bar:
                count = receive_version(
                    transport,
                    names,
                    args.out,
                    announcement,
                    on_message=bar.update,
                    on_manifest=lambda manifest: add_to_total(bar, manifest),
                    **options,
                )
            print(
                f"received version {announcement.version} ({announcement.shards} shards, {count} tensors, "
                f"{len(announcement.contributors)} contributing updates) into {args.out}"
            )
            return 0
        with byte_bar("receive", quiet=args.quiet) as bar:
            manifest = receive_file(
                transport,
                names.models_stream,
                args.out,
                args.stream,
                consume_arguments={"x-stream-offset": args.offset or "first"},
                on_message=bar.update,
                on_manifest=lambda manifest: add_to_total(bar, manifest),
                **options,
            )
    print(f"received stream {manifest.stream}: {len(manifest.tensors)} tensors into {args.out}")
    return 0

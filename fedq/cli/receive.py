"""Receive one model stream from the models stream of a namespace straight into a safetensors file.

The file appears only when the stream is complete; the model is never held in memory.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedq.cli.send import add_common_arguments
from fedq.topology import DEFAULT_TIMEOUT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, help="the safetensors file to write (appears only when complete)")
    parser.add_argument(
        "--stream", default=None, help="stream id to take (default: the first one that starts)"
    )
    parser.add_argument(
        "--offset",
        choices=["first", "last", "next"],
        default="first",
        help="where to read the models stream from: the oldest retained message, the last one, or new ones",
    )
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds of silence before giving up"
    )
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from fedq.progress import Progress
    from fedq.streaming import flow_for_budget, receive_file
    from fedq.topology import Names
    from fedq.transport import connect

    flow = flow_for_budget(args.memory_budget, args.chunk_bytes)
    names = Names(args.namespace)
    progress = Progress("receive", quiet=args.quiet)
    with connect(args.amqp_url, connect_timeout=0) as transport:
        manifest = receive_file(
            transport,
            names.models_stream,
            args.out,
            args.stream,
            timeout=args.timeout,
            memory_budget=args.memory_budget,
            prefetch=flow.prefetch,
            consume_arguments={"x-stream-offset": args.offset},
            on_message=progress.update,
        )
    progress.close()
    print(f"received stream {manifest.stream}: {len(manifest.tensors)} tensors into {args.out}")
    return 0

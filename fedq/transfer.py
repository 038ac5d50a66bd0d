"""``fedq send`` and ``fedq receive``: a model file through the broker as one container stream, with progress.

``send`` streams a safetensors file (memory-mapped, chunk by chunk) or a torch state-dict file (loaded with
``mmap``) to the models exchange of a namespace; ``receive`` writes one stream from the models stream straight
into a safetensors file. Neither holds the model in memory, so files larger than RAM go through. The topology
must exist (``fedq broker apply``).
"""

from __future__ import annotations

import argparse
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fedq.codecs import Codec, choose_codec, get_codec
from fedq.progress import Progress, human_bytes
from fedq.safetensors import SafetensorsReader
from fedq.streaming import (
    DEFAULT_TIMEOUT,
    Manifest,
    flow_for_budget,
    parse_size,
    plan,
    receive_file,
    send_container,
)
from fedq.topology import DEFAULT_CHUNK_BYTES, DEFAULT_NAMESPACE, Names
from fedq.transport import connect


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--namespace", default=DEFAULT_NAMESPACE, help="federation namespace (exchange/queue prefix)"
    )
    parser.add_argument(
        "--amqp-url", default=None, help="broker URL (default: FEDQ_AMQP_URL or the local broker)"
    )
    parser.add_argument(
        "--memory-budget", default="512MiB", help="process memory budget; sets window/prefetch"
    )
    parser.add_argument(
        "--chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES, help="payload bytes per chunk"
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no progress bar (also off when stderr is not a tty)"
    )


def add_send_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "file", type=Path, help="a .safetensors file, or a torch state dict saved with torch.save"
    )
    parser.add_argument("--codec", default="fp32", help="codec for large tensors (tiny ones stay fp32)")
    parser.add_argument("--stream", default=None, help="stream id (default: a new random id, printed)")
    _common(parser)


def add_receive_arguments(parser: argparse.ArgumentParser) -> None:
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
    _common(parser)


def _open(path: Path) -> Mapping[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return SafetensorsReader(path)
    return torch.load(path, mmap=True, weights_only=True, map_location="cpu")


def run_send(args: argparse.Namespace) -> int:
    budget = parse_size(args.memory_budget)
    flow = flow_for_budget(budget, args.chunk_bytes)
    tensors = _open(args.file)
    stream = args.stream or uuid.uuid4().hex
    meta: dict[str, Any] = {"kind": "full", "source": args.file.name}
    if isinstance(tensors, SafetensorsReader) and tensors.metadata:
        meta["metadata"] = tensors.metadata

    def codec_for(name: str, t: torch.Tensor) -> Codec:
        return choose_codec(name, tuple(t.shape), args.codec)

    manifest, _ = plan(tensors, stream=stream, meta=meta, codec_for=codec_for, chunk_bytes=args.chunk_bytes)
    progress = Progress("send", _wire_estimate(manifest), quiet=args.quiet)
    names = Names(args.namespace)
    with connect(
        args.amqp_url, window_messages=flow.window_messages, window_bytes=flow.window_bytes
    ) as transport:
        stats = send_container(
            transport,
            names.models_exchange,
            "",
            tensors,
            stream=stream,
            meta=meta,
            codec_for=codec_for,
            chunk_bytes=args.chunk_bytes,
            on_message=progress.update,
        )
    progress.close()
    print(
        f"sent stream {stream}: {stats.chunks} chunks, {human_bytes(stats.wire_bytes)} on the wire "
        f"({stats.wire_bytes / max(stats.fp32_bytes, 1):.1%} of fp32) in {stats.seconds:.1f} s"
    )
    return 0


def _wire_estimate(manifest: Manifest) -> int:
    """Payload bytes with each codec's default parameters: close enough for a progress bar."""
    return sum(get_codec(t.codec).payload_nbytes(t.numel) for t in manifest.tensors)


def run_receive(args: argparse.Namespace) -> int:
    budget = parse_size(args.memory_budget)
    flow = flow_for_budget(budget, args.chunk_bytes)
    names = Names(args.namespace)
    progress = Progress("receive", quiet=args.quiet)
    with connect(args.amqp_url) as transport:
        manifest = receive_file(
            transport,
            names.models_stream,
            args.out,
            args.stream,
            timeout=args.timeout,
            memory_budget=budget,
            prefetch=flow.prefetch,
            consume_arguments={"x-stream-offset": args.offset},
            on_message=progress.update,
        )
    progress.close()
    print(f"received stream {manifest.stream}: {len(manifest.tensors)} tensors into {args.out}")
    return 0

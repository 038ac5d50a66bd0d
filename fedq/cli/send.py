"""Stream a model file to the models exchange of a namespace, tensor by tensor, as one container stream.

A safetensors file is memory-mapped and a torch state-dict file loaded with ``mmap``: the model is never held
in memory, so files larger than RAM go through. The topology must exist (``fedq broker apply``).
"""

from __future__ import annotations

import argparse
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedq.cli.options import add_amqp_url, add_chunk_bytes, add_namespace, size
from fedq.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Mapping

    import torch


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """What ``send`` and ``receive`` share."""
    add_namespace(parser)
    add_amqp_url(parser)
    parser.add_argument(
        "--memory-budget", type=size, default="512MiB", help="process memory budget; sets window/prefetch"
    )
    add_chunk_bytes(parser)
    parser.add_argument(
        "--quiet", action="store_true", help="no progress bar (also off when stderr is not a tty)"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "file", type=Path, help="a .safetensors file, or a torch state dict saved with torch.save"
    )
    parser.add_argument("--codec", default="fp32", help="codec for large tensors (tiny ones stay fp32)")
    parser.add_argument("--stream", default=None, help="stream id (default: a new random id, printed)")
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from fedq.cli.progress import byte_bar, wire_estimate
    from fedq.codecs import Codec, choose_codec
    from fedq.safetensors import SafetensorsReader
    from fedq.streaming import flow_for_budget, plan, send_container
    from fedq.topology import Names
    from fedq.transport import connect
    from fedq.units import human_bytes

    flow = flow_for_budget(args.memory_budget, args.chunk_bytes)
    tensors = _open(args.file)
    stream = args.stream or uuid.uuid4().hex
    meta: dict[str, Any] = {"kind": "full", "source": args.file.name}
    if isinstance(tensors, SafetensorsReader) and tensors.metadata:
        meta["metadata"] = tensors.metadata

    def codec_for(name: str, t: torch.Tensor) -> Codec:
        return choose_codec(name, tuple(t.shape), args.codec)

    manifest, _ = plan(tensors, stream=stream, meta=meta, codec_for=codec_for, chunk_bytes=args.chunk_bytes)
    names = Names(args.namespace)
    with (
        connect(
            args.amqp_url,
            connect_timeout=0,  # a command run by hand fails at once with its cause; workers retry
            window_messages=flow.window_messages,
            window_bytes=flow.window_bytes,
        ) as transport,
        byte_bar("send", wire_estimate(manifest), quiet=args.quiet) as bar,
    ):
        stats = send_container(
            transport,
            names.models_exchange,
            "",
            tensors,
            stream=stream,
            meta=meta,
            codec_for=codec_for,
            chunk_bytes=args.chunk_bytes,
            on_message=bar.update,
        )
    print(
        f"sent stream {stream}: {stats.chunks} chunks, {human_bytes(stats.wire_bytes)} on the wire "
        f"({stats.wire_bytes / max(stats.fp32_bytes, 1):.1%} of fp32) in {stats.seconds:.1f} s"
    )
    return 0


def _open(path: Path) -> Mapping[str, torch.Tensor]:
    import pickle

    import torch

    from fedq.safetensors import SafetensorsReader

    if path.suffix == ".safetensors":
        return SafetensorsReader(path)
    try:
        state = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    except (RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        raise ConfigError(f"{path}: not a .safetensors file nor a torch state dict ({exc})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path}: holds no state dict of tensors")
    return state

"""``fedq bench codecs``: wire size, error and speed of every codec on a real model's shapes.

The state dict is generated tensor by tensor (never held whole): weight-like values N(0, 0.02) and delta-like
values N(0, 1e-5) of the same shapes. Every codec encodes and decodes every tensor (no per-tensor policy, so a
row shows the codec alone); times are summed per tensor. When bitsandbytes is installed (``fedq[compare]``),
its blockwise 8-bit and 4-bit nf4/fp4 quantizers run on the same tensors in the same run.

``--load N`` measures twice in one run: on the machine as it is, then with N busy processes per core started
by the bench (a library runs where its users train, on busy cores), at the same torch thread count.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from fedq.codecs import get_codec
from fedq.codecs.base import Codec
from fedq.device import resolve

log = logging.getLogger(__name__)

FEDQ_CODECS = ["fp32", "fp16", "bf16", "int8", "nf4", "fp4"]
VALUES = {"weights": 0.02, "deltas": 1e-5}

# x -> (wire bytes, decoded float32 tensor, encode seconds, decode seconds)
Method = Callable[[torch.Tensor], tuple[int, torch.Tensor, float, float]]


def gpt2_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """GPT-2 small (124 M): vocab 50257, context 1024, width 768, 12 layers; lm_head tied to wte."""
    d = 768
    shapes: list[tuple[str, tuple[int, ...]]] = [("wte.weight", (50257, d)), ("wpe.weight", (1024, d))]
    for i in range(12):
        p = f"h.{i}."
        shapes += [(p + "ln_1.weight", (d,)), (p + "ln_1.bias", (d,))]
        shapes += [(p + "attn.c_attn.weight", (d, 3 * d)), (p + "attn.c_attn.bias", (3 * d,))]
        shapes += [(p + "attn.c_proj.weight", (d, d)), (p + "attn.c_proj.bias", (d,))]
        shapes += [(p + "ln_2.weight", (d,)), (p + "ln_2.bias", (d,))]
        shapes += [(p + "mlp.c_fc.weight", (d, 4 * d)), (p + "mlp.c_fc.bias", (4 * d,))]
        shapes += [(p + "mlp.c_proj.weight", (4 * d, d)), (p + "mlp.c_proj.bias", (d,))]
    return [*shapes, ("ln_f.weight", (d,)), ("ln_f.bias", (d,))]


def llama_3_2_1b_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """Llama-3.2-1B from its public config: hidden 2048, 16 layers, 32 heads / 8 KV heads of 64, MLP 8192,
    vocab 128256. Its embeddings are tied (1.236 B parameters), but a PyTorch state dict lists lm_head.weight
    as its own entry; counting it gives the 5716 MiB of fp32 that NVIDIA FLARE reports, so it is included."""
    d, kv, ff, vocab = 2048, 8 * 64, 8192, 128256
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, d))]
    for i in range(16):
        p = f"model.layers.{i}."
        shapes += [(p + "self_attn.q_proj.weight", (d, d)), (p + "self_attn.k_proj.weight", (kv, d))]
        shapes += [(p + "self_attn.v_proj.weight", (kv, d)), (p + "self_attn.o_proj.weight", (d, d))]
        shapes += [(p + "mlp.gate_proj.weight", (ff, d)), (p + "mlp.up_proj.weight", (ff, d))]
        shapes += [(p + "mlp.down_proj.weight", (d, ff))]
        shapes += [(p + "input_layernorm.weight", (d,)), (p + "post_attention_layernorm.weight", (d,))]
    return [*shapes, ("model.norm.weight", (d,)), ("lm_head.weight", (vocab, d))]


def lora_shapes(rank: int, width: int, layers: int = 4) -> list[tuple[str, tuple[int, ...]]]:
    """LoRA adapters of ``rank`` on the q and v projections of ``layers`` ``width``-wide layers: A is
    (rank, width), B (width, rank), as PEFT stores them."""
    shapes: list[tuple[str, tuple[int, ...]]] = []
    for i in range(layers):
        for proj in ("q_proj", "v_proj"):
            p = f"model.layers.{i}.self_attn.{proj}."
            shapes += [(p + "lora_A.weight", (rank, width)), (p + "lora_B.weight", (width, rank))]
    return shapes


SHAPES: dict[str, Callable[[], list[tuple[str, tuple[int, ...]]]]] = {
    "gpt2": gpt2_shapes,
    "llama-3.2-1b": llama_3_2_1b_shapes,
    **{
        f"lora-r{rank}-w{width}": functools.partial(lora_shapes, rank, width)
        for rank in (8, 16)
        for width in (2048, 4096, 8192)
    },
    "lora-r4-w32": functools.partial(lora_shapes, 4, 32, layers=1),  # the tests' tiny Llama
}


@dataclass
class Row:
    codec: str
    impl: str
    values: str
    shapes: str
    load: int  # busy processes per core started by the bench
    threads: int
    device: str
    elements: int = 0
    wire_bytes: int = 0
    encode_s: float = 0.0
    decode_s: float = 0.0
    err2: float = 0.0
    ref2: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "codec": self.codec,
            "impl": self.impl,
            "values": self.values,
            "shapes": self.shapes,
            "load_per_core": self.load,
            "torch_threads": self.threads,
            "device": self.device,
            "wire_bytes": self.wire_bytes,
            "fp32_bytes": 4 * self.elements,
            "rel_l2": math.sqrt(self.err2 / self.ref2) if self.ref2 else 0.0,
            "encode_melem_s": self.elements / self.encode_s / 1e6 if self.encode_s else 0.0,
            "decode_melem_s": self.elements / self.decode_s / 1e6 if self.decode_s else 0.0,
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fedq_method(codec: Codec, device: torch.device) -> Method:
    def run(x: torch.Tensor) -> tuple[int, torch.Tensor, float, float]:
        flat = x.reshape(-1)
        t0 = time.perf_counter()
        meta, payload = codec.encode(flat)
        t1 = time.perf_counter()
        y = codec.decode(meta, payload, flat.numel(), device)
        _sync(device)
        return memoryview(payload).nbytes, y, t1 - t0, time.perf_counter() - t1

    return run


def bnb_methods(device: torch.device) -> dict[str, Method]:
    """bitsandbytes' blockwise quantizers at their defaults (8-bit: block 4096; 4-bit: block 64 with the block
    maxima double-quantized), or nothing when it is not installed. Wire bytes count codes, block maxima and
    nested statistics; the fixed code tables (constants of the format) are not counted."""
    try:
        bnb: Any = importlib.import_module("bitsandbytes.functional")
    except ImportError:
        return {}

    def int8(x: torch.Tensor) -> tuple[int, torch.Tensor, float, float]:
        t0 = time.perf_counter()
        q, state = bnb.quantize_blockwise(x, blocksize=4096)
        _sync(device)
        t1 = time.perf_counter()
        y = bnb.dequantize_blockwise(q, state)
        _sync(device)
        return q.nbytes + state.absmax.nbytes, y, t1 - t0, time.perf_counter() - t1

    def four_bit(kind: str) -> Method:
        def run(x: torch.Tensor) -> tuple[int, torch.Tensor, float, float]:
            t0 = time.perf_counter()
            q, state = bnb.quantize_4bit(x, blocksize=64, quant_type=kind, compress_statistics=True)
            _sync(device)
            t1 = time.perf_counter()
            y = bnb.dequantize_4bit(q, state)
            _sync(device)
            nbytes = q.nbytes + state.absmax.nbytes + state.state2.absmax.nbytes + state.offset.nbytes
            return nbytes, y, t1 - t0, time.perf_counter() - t1

        return run

    return {"int8": int8, "nf4": four_bit("nf4"), "fp4": four_bit("fp4")}


def _tensors(
    shapes: list[tuple[str, tuple[int, ...]]], device: torch.device
) -> Iterator[tuple[str, torch.Tensor]]:
    """One standard-normal tensor at a time, reproducibly (seeded per tensor)."""
    for i, (name, shape) in enumerate(shapes):
        g = torch.Generator(device=device).manual_seed(i)
        yield name, torch.randn(shape, generator=g, device=device)


# a busy loop that ends when its parent does (a bench killed by a signal cannot stop it itself)
_SPIN = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    for _ in range(10**6): pass"


@contextlib.contextmanager
def busy_processes(per_core: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``per_core`` busy-looping processes per core of this machine for the scope: the load of a training
    loop, data loaders and other jobs sharing the cores."""
    cores = os.cpu_count() or 1
    procs = [subprocess.Popen([sys.executable, "-c", _SPIN]) for _ in range(per_core * cores)]
    try:
        time.sleep(0.5 if procs else 0)  # let them start spinning
        yield procs
    finally:
        for p in procs:
            p.kill()
            p.wait()


def measure(
    shapes_name: str,
    device: torch.device,
    codecs: list[str] | None = None,
    values: list[str] | None = None,
    load: int = 0,
) -> list[Row]:
    """Rows for every codec (or ``codecs``) on every value kind (or ``values``), under ``load`` busy processes
    per core."""
    shapes = SHAPES[shapes_name]()
    wanted = codecs or FEDQ_CODECS
    methods: list[tuple[str, str, Method]] = [
        (name, "fedq", fedq_method(get_codec(name), device)) for name in wanted
    ]
    compare = bnb_methods(device)
    methods += [(name, "bitsandbytes", m) for name, m in compare.items() if name in wanted]
    if not compare:
        log.info("bitsandbytes is not installed (pip install 'fedq[compare]'): fedq codecs only")
    kinds = {v: VALUES[v] for v in values or VALUES}
    threads = torch.get_num_threads()
    rows = {
        (v, c, impl): Row(c, impl, v, shapes_name, load, threads, str(device))
        for v in kinds
        for c, impl, _ in methods
    }
    with busy_processes(load):
        _measure_into(rows, methods, shapes, kinds, device)
    return list(rows.values())


def _measure_into(
    rows: dict[tuple[str, str, str], Row],
    methods: list[tuple[str, str, Method]],
    shapes: list[tuple[str, tuple[int, ...]]],
    kinds: dict[str, float],
    device: torch.device,
) -> None:
    for k, (name, z) in enumerate(_tensors(shapes, device)):
        log.debug("%d/%d %s %s", k + 1, len(shapes), name, tuple(z.shape))
        for values, std in kinds.items():
            x = z * std
            ref2 = float(x.norm()) ** 2
            for codec, impl, method in methods:
                nbytes, y, t_enc, t_dec = method(x)
                row = rows[values, codec, impl]
                row.elements += x.numel()
                row.wire_bytes += nbytes
                row.encode_s += t_enc
                row.decode_s += t_dec
                row.err2 += float(y.reshape(-1).sub_(x.reshape(-1)).norm()) ** 2
                row.ref2 += ref2
                del y
            del x


def format_table(rows: list[Row]) -> str:
    head = (
        f"{'load':>4} {'values':8} {'codec':5} {'impl':12} {'wire MiB':>10} {'% fp32':>7} {'bits/param':>10} "
        f"{'rel-L2':>9} {'enc M/s':>8} {'dec M/s':>8}"
    )
    lines = [head, "-" * len(head)]
    for row in rows:
        j = row.as_json()
        lines.append(
            f"{row.load:4} {row.values:8} {row.codec:5} {row.impl:12} {row.wire_bytes / 2**20:10.1f} "
            f"{100 * row.wire_bytes / j['fp32_bytes']:7.3f} {8 * row.wire_bytes / row.elements:10.4f} "
            f"{j['rel_l2']:9.2e} {j['encode_melem_s']:8.0f} {j['decode_melem_s']:8.0f}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    device = resolve(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = SHAPES[args.shapes]()
    n = sum(math.prod(s) for _, s in shapes)
    print(
        f"{args.shapes}: {len(shapes)} tensors, {n / 1e9:.3f} G elements, {4 * n / 2**20:.0f} MiB fp32; "
        f"device {device}, {torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    values = [args.values] if args.values else None
    rows: list[Row] = []
    for load in [0, args.load] if args.load else [0]:
        rows += measure(args.shapes, device, args.codecs, values, load)
        print(f"load {load} per core done; load average {os.getloadavg()[0]:.2f}", flush=True)
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.as_json() for r in rows], f, indent=1)
    return 0

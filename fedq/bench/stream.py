"""``fedq bench stream``: peak memory and throughput of regular, container and file streaming via the broker.

One sender process and one receiver process (spawned, so each one's peak RSS is its own) move a state dict of
real model shapes through the local broker. The physical baseline, measured in the same run, is raw pika: the
same number of bytes in the same chunk size, persistent, published with confirms and consumed with acks,
through the same queue. ``regular`` is the naive way (serialize the whole state dict to one buffer, send it in
chunks, reassemble, deserialize); ``container`` streams the in-memory state dict; ``file`` streams a
safetensors file from disk to disk.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import queue
import resource
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from fedq.bench import broker_url
from fedq.codecs import Codec, choose_codec, get_codec
from fedq.errors import BenchError
from fedq.metrics import current_rss_bytes
from fedq.safetensors import SafetensorsReader, SafetensorsWriter, TensorSpec
from fedq.streaming import (
    Flow,
    flow_for_budget,
    receive_container,
    receive_file,
    send_container,
)
from fedq.topology import Names
from fedq.transport import connect

MODES = ("regular", "container", "file")
WEIGHT_STD = 0.02
_FILL_STEP = 1 << 24  # elements generated at a time when writing the input file


def _gpt2() -> dict[str, tuple[int, ...]]:
    d, v, n = 768, 50257, 12
    shapes: dict[str, tuple[int, ...]] = {"wte.weight": (v, d), "wpe.weight": (1024, d)}
    for i in range(n):
        p = f"h.{i}."
        shapes |= {
            p + "ln_1.weight": (d,),
            p + "ln_1.bias": (d,),
            p + "attn.c_attn.weight": (d, 3 * d),
            p + "attn.c_attn.bias": (3 * d,),
            p + "attn.c_proj.weight": (d, d),
            p + "attn.c_proj.bias": (d,),
            p + "ln_2.weight": (d,),
            p + "ln_2.bias": (d,),
            p + "mlp.c_fc.weight": (d, 4 * d),
            p + "mlp.c_fc.bias": (4 * d,),
            p + "mlp.c_proj.weight": (4 * d, d),
            p + "mlp.c_proj.bias": (d,),
        }
    return shapes | {"ln_f.weight": (d,), "ln_f.bias": (d,)}


def _llama(d: int, ffn: int, layers: int, kv: int, vocab: int = 128256) -> dict[str, tuple[int, ...]]:
    """Llama shapes from the public configs; lm_head listed as the state dict holds it (3.2-1B: 5716 MiB)."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, d)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (d, d),
            p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d),
            p + "self_attn.o_proj.weight": (d, d),
            p + "mlp.gate_proj.weight": (ffn, d),
            p + "mlp.up_proj.weight": (ffn, d),
            p + "mlp.down_proj.weight": (d, ffn),
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
        }
    return shapes | {"model.norm.weight": (d,), "lm_head.weight": (vocab, d)}


SHAPES: dict[str, Callable[[], dict[str, tuple[int, ...]]]] = {
    "tiny": lambda: {"embed.weight": (4096, 256), "block.weight": (1024, 1024), "block.bias": (1024,)},
    "gpt2": _gpt2,
    "llama-3.2-1b": lambda: _llama(2048, 8192, 16, 512),
    "llama-3.1-8b": lambda: _llama(4096, 14336, 32, 1024),
}


def run(args: argparse.Namespace) -> int:
    url = broker_url(args.amqp_url)
    shapes = SHAPES[args.shapes]()
    fp32_bytes = 4 * sum(_numel(s) for s in shapes.values())
    budget = args.memory_budget
    names = Names(f"benchstream{uuid.uuid4().hex[:8]}")
    work = Path(args.dir or tempfile.mkdtemp(prefix="fedq-bench-"))
    print(
        f"{args.shapes}: {sum(_numel(s) for s in shapes.values()) / 1e9:.3f} B parameters, "
        f"{fp32_bytes / 2**20:.0f} MiB fp32; chunks of {args.chunk_bytes >> 20} MiB; "
        f"budget {budget >> 20} MiB",
        flush=True,
    )
    ctx = mp.get_context("spawn")
    rows: list[dict[str, Any]] = []
    raw_cache: dict[int, dict[str, Any]] = {}
    with connect(url) as transport:
        transport.declare(names, 1)
    try:
        for codec in args.codec or ["fp32", "nf4"]:
            for mode in args.mode or list(MODES):
                job = {
                    "mode": mode,
                    "codec": codec,
                    "shapes": args.shapes,
                    "dtype": args.dtype,
                    "url": url,
                    "namespace": names.namespace,
                    "chunk_bytes": args.chunk_bytes,
                    "budget": budget,
                    "source": str(work / "source.safetensors"),
                    "target": str(work / "received.safetensors"),
                }
                if mode == "file" and not Path(job["source"]).exists():
                    _in_child(ctx, _write_source, job)
                result = run_pair(ctx, _send, _receive, job)
                for n in (result["wire_bytes"], fp32_bytes):
                    if n not in raw_cache:
                        raw_cache[n] = run_pair(ctx, raw_send, raw_receive, {**job, "nbytes": n})
                row = {
                    "mode": mode,
                    "codec": codec,
                    "shapes": args.shapes,
                    "dtype": args.dtype,
                    "sender_peak_rss": result["sender_peak_rss"],
                    "receiver_peak_rss": result["receiver_peak_rss"],
                    "model_fp32_bytes": fp32_bytes,
                    "wire_bytes": result["wire_bytes"],
                    "seconds": result["seconds"],
                    "sender_cpu_seconds": result["sender_cpu_seconds"],
                    "receiver_cpu_seconds": result["receiver_cpu_seconds"],
                    "raw_baseline_seconds": raw_cache[result["wire_bytes"]]["seconds"],
                    "raw_fp32_seconds": raw_cache[fp32_bytes]["seconds"],
                    "raw_baseline_cpu_seconds": [
                        raw_cache[result["wire_bytes"]][k]
                        for k in ("sender_cpu_seconds", "receiver_cpu_seconds")
                    ],
                    "memory_budget": budget,
                }
                rows.append(row)
                _print_row(row)
                Path(job["target"]).unlink(missing_ok=True)
    finally:
        Path(work / "source.safetensors").unlink(missing_ok=True)
        if not args.dir:
            work.rmdir()
        delete_namespace(url, names)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _print_row(row: dict[str, Any]) -> None:
    model = row["model_fp32_bytes"]
    mb_s = model / row["seconds"] / 1e6
    print(
        f"{row['mode']:>9} {row['codec']:>5}: {row['seconds']:7.2f} s, {mb_s:7.1f} MB/s (fp32-equivalent), "
        f"wire {row['wire_bytes'] / 2**20:7.0f} MiB, "
        f"sender peak {row['sender_peak_rss'] / 2**20:6.0f} MiB ({row['sender_peak_rss'] / model:.2f}x), "
        f"receiver peak {row['receiver_peak_rss'] / 2**20:6.0f} MiB "
        f"({row['receiver_peak_rss'] / model:.2f}x), "
        f"CPU sender {row['sender_cpu_seconds']:.1f} s, receiver {row['receiver_cpu_seconds']:.1f} s, "
        f"raw broker same bytes {row['raw_baseline_seconds']:.2f} s "
        f"(CPU {row['raw_baseline_cpu_seconds'][0]:.1f} + {row['raw_baseline_cpu_seconds'][1]:.1f} s; "
        f"throughput {row['raw_baseline_seconds'] / row['seconds']:.2f}x of raw), "
        f"raw fp32 {row['raw_fp32_seconds']:.2f} s (time {row['seconds'] / row['raw_fp32_seconds']:.2f}x)",
        flush=True,
    )


# Processes --------------------------------------------------------------------------------------------------


def run_pair(
    ctx: Any,
    sender: Callable[..., dict[str, Any]],
    receiver: Callable[..., dict[str, Any]],
    job: dict[str, Any],
) -> dict[str, Any]:
    """Run a receiver and a sender process; seconds = receiver done - sender started (one monotonic clock)."""
    results = ctx.Queue()
    ready = ctx.Event()
    procs = [
        ctx.Process(target=_child, args=(receiver, job, ready, results, "receiver")),
        ctx.Process(target=_child, args=(sender, job, ready, results, "sender")),
    ]
    for p in procs:
        p.start()
    got: dict[str, dict[str, Any]] = {}
    while len(got) < 2:
        try:
            role, value = results.get(timeout=1.0)
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in procs):  # died before it could report
                role, value = "a process", "exited with " + ", ".join(str(p.exitcode) for p in procs)
            else:
                continue
        if isinstance(value, str):
            for p in procs:
                p.terminate()
            raise BenchError(f"{role} failed: {value}")
        got[role] = value
    for p in procs:
        p.join()
    send, recv = got["sender"], got["receiver"]
    return {
        "seconds": recv["end"] - send["start"],
        "sender_peak_rss": send["peak_rss"],
        "receiver_peak_rss": recv["peak_rss"],
        "sender_cpu_seconds": send["cpu_seconds"],
        "receiver_cpu_seconds": recv["cpu_seconds"],
        "wire_bytes": send["wire_bytes"],
    }


def _child(
    work: Callable[..., dict[str, Any]], job: dict[str, Any], ready: Any, results: Any, role: str
) -> None:
    # One core each for sender and receiver: torch's intra-op threads spin against each other otherwise
    # (measured on a loaded 2-core machine: a 4 MiB reduction takes 30-50 ms with 2 threads, 1 ms with 1).
    torch.set_num_threads(1)
    try:
        out = work(job, ready)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        out["peak_rss"] = usage.ru_maxrss * 1024
        out["cpu_seconds"] = usage.ru_utime + usage.ru_stime - out.pop("cpu_at_start")
        results.put((role, out))
    except BaseException as exc:  # reported to the parent, which stops the pair
        results.put((role, f"{type(exc).__name__}: {exc}"))
        raise


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _in_child(ctx: Any, work: Callable[[dict[str, Any]], None], job: dict[str, Any]) -> None:
    p = ctx.Process(target=work, args=(job,))
    p.start()
    p.join()
    if p.exitcode != 0:
        raise BenchError(f"{work.__name__} failed with exit code {p.exitcode}")


def _write_source(job: dict[str, Any]) -> None:
    """The file-mode input, written slice by slice so that this process never holds the model either."""
    dtype = getattr(torch, job["dtype"])
    shapes = SHAPES[job["shapes"]]()
    writer = SafetensorsWriter(job["source"], {n: TensorSpec(dtype, s) for n, s in shapes.items()})
    gen = torch.Generator().manual_seed(0)
    for name, shape in shapes.items():
        n = _numel(shape)
        for lo in range(0, n, _FILL_STEP):
            count = min(_FILL_STEP, n - lo)
            writer.write(name, lo, torch.randn(count, generator=gen) * WEIGHT_STD)
    writer.commit()


def _random_state_dict(job: dict[str, Any]) -> dict[str, torch.Tensor]:
    dtype = getattr(torch, job["dtype"])
    gen = torch.Generator().manual_seed(0)
    out = {}
    for name, shape in SHAPES[job["shapes"]]().items():
        t = torch.empty(shape, dtype=dtype)
        t.normal_(0.0, WEIGHT_STD, generator=gen)
        out[name] = t
    return out


def _codec_for(job: dict[str, Any]) -> Callable[[str, torch.Tensor], Codec]:
    return lambda name, t: choose_codec(name, tuple(t.shape), job["codec"])


def _transport(job: dict[str, Any], flow: Flow) -> Any:
    return connect(job["url"], window_messages=flow.window_messages, window_bytes=flow.window_bytes)


def _send(job: dict[str, Any], ready: Any) -> dict[str, Any]:
    flow = flow_for_budget(job["budget"], job["chunk_bytes"])  # before the model exists: the window's share
    names = Names(job["namespace"])
    with _transport(job, flow) as transport:
        if job["mode"] == "file":
            tensors: Any = SafetensorsReader(job["source"])
        else:
            tensors = _random_state_dict(job)
        ready.wait()
        start, cpu_at_start = time.monotonic(), _cpu()
        if job["mode"] == "regular":
            wire_bytes = _send_regular(transport, names, tensors, job)
        else:
            stats = send_container(
                transport,
                names.updates_exchange,
                names.shard_key(0),
                tensors,
                stream=uuid.uuid4().hex,
                meta={"kind": "full"},
                codec_for=_codec_for(job),
                chunk_bytes=job["chunk_bytes"],
                role="bench",
            )
            wire_bytes = stats.wire_bytes
    return {"start": start, "wire_bytes": wire_bytes, "cpu_at_start": cpu_at_start}


def _send_regular(transport: Any, names: Names, tensors: dict[str, torch.Tensor], job: dict[str, Any]) -> int:
    """The naive path: the whole (encoded) state dict serialized into one buffer, then sent in slices."""
    if job["codec"] != "fp32":
        codec_for = _codec_for(job)
        encoded = {}
        for name, t in tensors.items():
            codec = codec_for(name, t)
            meta, payload = codec.encode(t.reshape(-1))
            # as a uint8 tensor: torch.save pickles bytes as latin-1 text, inflating them by ~1.45x
            array = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
            encoded[name] = (codec.name, codec.config(), meta, tuple(t.shape), array)
        obj: Any = encoded
    else:
        obj = tensors
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getbuffer()
    step = job["chunk_bytes"]
    for lo in range(0, len(data), step):
        transport.publish(
            names.updates_exchange,
            names.shard_key(0),
            data[lo : lo + step],
            headers={"total": len(data), "offset": lo},
        )
    transport.flush()
    return len(data)


def _receive(job: dict[str, Any], ready: Any) -> dict[str, Any]:
    flow = flow_for_budget(job["budget"], job["chunk_bytes"])
    names = Names(job["namespace"])
    queue_name = names.updates_queue(0)
    # container mode receives into a state dict of the model's shapes, as a client receives into its model
    model = _random_state_dict(job) if job["mode"] == "container" else None
    with _transport(job, flow) as transport:
        ready.set()
        cpu_at_start = _cpu()
        if job["mode"] == "regular":
            _receive_regular(transport, queue_name, flow)
        elif job["mode"] == "container":
            container = receive_container(
                transport, queue_name, into=model, prefetch=flow.prefetch, role="bench"
            )
            assert len(container.tensors) == len(SHAPES[job["shapes"]]())
        else:
            receive_file(
                transport,
                queue_name,
                job["target"],
                prefetch=flow.prefetch,
                memory_budget=job["budget"],
                role="bench",
            )
        end = time.monotonic()
    return {"end": end, "rss_end": current_rss_bytes(), "cpu_at_start": cpu_at_start}


def _receive_regular(transport: Any, queue_name: str, flow: Flow) -> dict[str, torch.Tensor]:
    """Each slice goes to its offset and a slice seen before is skipped: the broker may redeliver a message
    (after a reconnect) or hand slices over out of order, as it may for any stream."""
    tag = transport.consume(queue_name, prefetch=flow.prefetch)
    buf: bytearray | None = None
    offsets: set[int] = set()
    got = 0
    while buf is None or got < len(buf):
        delivery = transport.get(timeout=120)
        if delivery is None:
            raise TimeoutError("regular receive: the sender went silent")
        if buf is None:
            buf = bytearray(int(delivery.headers["total"]))
        offset = int(delivery.headers["offset"])
        if offset not in offsets:
            offsets.add(offset)
            buf[offset : offset + len(delivery.body)] = delivery.body
            got += len(delivery.body)
        transport.ack(delivery)
    transport.cancel(tag)
    obj = torch.load(io.BytesIO(buf), weights_only=True)
    del buf
    if not obj or isinstance(next(iter(obj.values())), torch.Tensor):
        return obj
    return {
        name: get_codec(codec, **params)
        .decode(meta, payload.numpy().data, _numel(shape), torch.device("cpu"))
        .view(shape)
        for name, (codec, params, meta, shape, payload) in obj.items()
    }


# Raw pika baseline ------------------------------------------------------------------------------------------


def _raw_bodies(nbytes: int, step: int) -> Iterator[bytes]:
    block = os.urandom(step)
    for lo in range(0, nbytes, step):
        yield block[: min(step, nbytes - lo)]


def raw_send(job: dict[str, Any], ready: Any) -> dict[str, Any]:
    import pika

    names = Names(job["namespace"])
    conn = pika.BlockingConnection(pika.URLParameters(job["url"]))
    channel = conn.channel()
    channel.confirm_delivery()
    props = pika.BasicProperties(delivery_mode=2)
    ready.wait()
    start, cpu_at_start = time.monotonic(), _cpu()
    for body in _raw_bodies(job["nbytes"], job["chunk_bytes"]):
        while True:
            try:
                channel.basic_publish(names.updates_exchange, names.shard_key(0), body, props, mandatory=True)
                break
            except pika.exceptions.NackError:  # the queue is at its length limit: wait for the consumer
                time.sleep(0.05)
    conn.close()
    return {"start": start, "wire_bytes": job["nbytes"], "cpu_at_start": cpu_at_start}


def raw_receive(job: dict[str, Any], ready: Any) -> dict[str, Any]:
    import pika

    flow = flow_for_budget(job["budget"], job["chunk_bytes"])
    conn = pika.BlockingConnection(pika.URLParameters(job["url"]))
    channel = conn.channel()
    channel.basic_qos(prefetch_count=flow.prefetch)
    ready.set()
    cpu_at_start = _cpu()
    got = 0
    for method, _props, body in channel.consume(
        Names(job["namespace"]).updates_queue(0), inactivity_timeout=120
    ):
        if method is None:
            raise TimeoutError("raw receive: the publisher went silent")
        got += len(body)
        channel.basic_ack(method.delivery_tag)
        if got >= job["nbytes"]:
            break
    end = time.monotonic()
    channel.cancel()
    conn.close()
    return {"end": end, "cpu_at_start": cpu_at_start}


def delete_namespace(url: str, names: Names) -> None:
    import pika

    from fedq.topology import definitions

    spec = definitions(names, 1)
    conn = pika.BlockingConnection(pika.URLParameters(url))
    channel = conn.channel()
    for q in spec["queues"]:
        channel.queue_delete(q["name"])
    for exchange in spec["exchanges"]:
        channel.exchange_delete(exchange["name"])
    conn.close()


if __name__ == "__main__":  # python -m fedq.bench.stream ARGS is fedq bench stream ARGS
    from fedq.cli import main

    sys.exit(main(["bench", "stream", *sys.argv[1:]]))

"""A Llama-shaped safetensors file sent through the real broker and received into a file, at the process's
default torch threads (so with as many encoders as a user's process gets), checked tensor by tensor, bit for
bit, against the file's values through the codec chunk by chunk. Used for docs/reliability.md ("What travels
is what was sent"); run from a checkout with ``PYTHONPATH`` set to it, a broker at ``FEDQ_AMQP_URL``
(default the local one) with its management API:

    python docs/scripts/file_send_check.py --runs 3

Prints one line per send (codec, chunk size, the tensors that arrived different) and the total of wrong
tensors; every queue and exchange it declared is deleted afterwards.
"""

from __future__ import annotations

import argparse
import tempfile
import uuid
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fedq import streaming
from fedq.broker import Management, management_url_for, q, vhost_of
from fedq.codecs import choose_codec
from fedq.safetensors import SafetensorsReader, save_file
from fedq.topology import Names
from fedq.transport import connect, default_url


def llama_file(directory: Path) -> Path:
    """Four layers of a small Llama: large matrices of several chunks, each layer's norms between them."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config)
    return save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, directory / "llama.safetensors"
    )


def send_and_receive(url: str, source: Path, out: Path, codec: str, chunk_bytes: int) -> None:
    names = Names(f"filecheck{uuid.uuid4().hex[:8]}")
    reader = SafetensorsReader(source)
    try:
        with connect(url) as transport:
            transport.declare(names, 1)
            streaming.send_container(
                transport,
                names.updates_exchange,
                names.shard_key(0),
                reader,
                stream="file",
                meta={"metadata": reader.metadata},
                codec_for=lambda name, t: choose_codec(name, tuple(t.shape), codec),
                chunk_bytes=chunk_bytes,
            )
            streaming.receive_file(transport, names.updates_queue(0), out, timeout=60)
    finally:
        reader.close()
        delete_namespace(url, names.namespace)


def delete_namespace(url: str, namespace: str) -> None:
    management, vhost = Management(management_url_for(url)), vhost_of(url)
    for kind in ("queues", "exchanges"):
        for item in management.get(f"/{kind}/{q(vhost)}?columns=name"):
            if item["name"].startswith(namespace + "."):
                management.delete(f"/{kind}/{q(vhost)}/{q(item['name'])}")


def wrong_tensors(source: Path, out: Path, codec: str, chunk_bytes: int) -> list[str]:
    """Tensors of ``out`` that differ in any bit from ``source``'s values through ``codec``, encoded and
    decoded chunk by chunk as the sender cuts them."""
    wrong = []
    with SafetensorsReader(source) as sent, SafetensorsReader(out) as got:
        for name in sent:
            flat = sent[name].reshape(-1)
            c = choose_codec(name, tuple(sent[name].shape), codec)
            step = streaming.chunk_elements_for(c, chunk_bytes)
            pieces = [flat[lo : lo + step] for lo in range(0, flat.numel(), step)]
            expected = torch.cat([c.decode(*c.encode(p), p.numel(), torch.device("cpu")) for p in pieces])
            if not torch.equal(got[name].reshape(-1).float(), expected.to(flat.dtype).float()):
                wrong.append(name)
    return wrong


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    url = default_url()
    print(f"torch threads {torch.get_num_threads()}, streaming from {streaming.__file__}")
    total = 0
    with tempfile.TemporaryDirectory() as tmp:
        source = llama_file(Path(tmp))
        for _ in range(args.runs):
            for codec in ("fp32", "nf4"):
                for chunk_bytes in (16 << 10, 64 << 10, 256 << 10):
                    out = Path(tmp) / "out.safetensors"
                    send_and_receive(url, source, out, codec, chunk_bytes)
                    wrong = wrong_tensors(source, out, codec, chunk_bytes)
                    total += len(wrong)
                    print(
                        f"{codec} chunks of {chunk_bytes >> 10} KiB: {len(wrong)} wrong {wrong[:3]}",
                        flush=True,
                    )
    print(f"wrong tensors in all: {total}")


if __name__ == "__main__":
    main()

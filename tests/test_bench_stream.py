"""``fedq bench stream``'s regular mode survives what a broker may do to any stream of messages."""

from __future__ import annotations

import random
from typing import Any

import torch

from fedq.bench import stream
from fedq.streaming import flow_for_budget
from fedq.topology import Names
from fedq.transport import connect


class _Recorder:
    """What ``_send_regular`` calls on a transport: each message, in publish order."""

    def __init__(self) -> None:
        self.messages: list[tuple[bytes, dict[str, Any]]] = []

    def publish(self, exchange: str, routing_key: str, body: bytes, headers: dict[str, Any]) -> None:
        self.messages.append((bytes(body), headers))

    def flush(self) -> None:
        pass


def test_regular_receive_takes_slices_out_of_order_and_redelivered() -> None:
    names = Names("bench-regular")
    tensors = {"w": torch.randn(300, 200), "b": torch.randn(200)}
    recorder = _Recorder()
    stream._send_regular(recorder, names, tensors, {"codec": "fp32", "chunk_bytes": 16 << 10})
    assert len(recorder.messages) > 10
    messages = recorder.messages + recorder.messages[3:5]  # two slices redelivered
    random.Random(0).shuffle(messages)
    with connect("memory://bench-regular") as transport:
        transport.declare(names, 1)
        for body, headers in messages:
            transport.publish(names.updates_exchange, names.shard_key(0), body, headers=headers)
        received = stream._receive_regular(transport, names.updates_queue(0), flow_for_budget(None))
    assert received.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(received[name], tensor), name

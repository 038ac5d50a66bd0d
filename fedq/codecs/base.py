"""The codec interface: one 1-D slice of a tensor <-> a payload of bytes plus small per-chunk metadata."""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import torch

Buffer = bytes | bytearray | memoryview


class Codec(abc.ABC):
    """Encodes 1-D float slices to payloads and back; the same code runs on CPU and CUDA."""

    name: ClassVar[str]
    alignment: ClassVar[int] = 1

    def config(self) -> dict[str, Any]:
        """Parameters decoding needs, written in every chunk header (msgpack-able)."""
        return {}

    @abc.abstractmethod
    def payload_nbytes(self, count: int) -> int:
        """Exact payload size in bytes for ``count`` elements, metadata included."""

    @abc.abstractmethod
    def encode(self, x: torch.Tensor) -> tuple[dict[str, Any], Buffer]:
        """Encode a 1-D float tensor; return (per-chunk meta, payload bytes on the CPU)."""

    @abc.abstractmethod
    def decode(self, meta: dict[str, Any], payload: Buffer, count: int, device: torch.device) -> torch.Tensor:
        """Decode a payload to a 1-D float32 tensor of ``count`` elements on ``device``."""


def as_uint8(payload: Buffer, device: torch.device) -> torch.Tensor:
    """View a payload as a uint8 tensor without copying on the CPU (one copy to reach another device)."""
    view = memoryview(payload)
    if view.readonly:
        view = memoryview(bytearray(view))
    t = torch.frombuffer(view, dtype=torch.uint8) if len(view) else torch.empty(0, dtype=torch.uint8)
    return t.to(device, non_blocking=True) if device.type != "cpu" else t


def to_payload(t: torch.Tensor) -> memoryview:
    """A CPU, contiguous tensor's bytes as a memoryview, without copying on the CPU."""
    t = t.detach().contiguous()
    if t.device.type != "cpu":
        t = t.cpu()
    return memoryview(t.view(torch.uint8).numpy()).cast("B")

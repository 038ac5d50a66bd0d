"""Where fedq's tensors live, and how payload bytes cross between a GPU and the host.

A client's model may live on a GPU, and an aggregator may fold on one. There, a copy from pageable host
memory is synchronous and goes through a driver bounce buffer; a copy from or into page-locked (pinned)
memory runs at the bus's speed and, issued on a stream of its own, overlaps the kernels of the compute
stream. So payloads cross in pinned buffers on one copy stream per device, and an event says when the bytes
have arrived: the host waits on it before it hands bytes to the transport (``HostCopy.wait``), the compute
stream before it reads bytes it was sent (``DeviceCopy.ready``). On a CPU-only build (CI) every step here is
the plain operation: pinning needs CUDA (``torch.cuda.is_available()``) and there is no stream to overlap,
so the same code runs.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import torch

from fedq.errors import ConfigError

T = TypeVar("T")
S = TypeVar("S")

Bytes = bytes | bytearray | memoryview


def resolve(requested: str | torch.device) -> torch.device:
    """The device a run uses: ``auto`` is the first CUDA device when this torch build and machine have one,
    else the CPU; anything else is taken as named, and refused when it is no device or a CUDA device that is
    not there."""
    if isinstance(requested, str) and requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ConfigError(
            f"device {requested!r}: not a torch device (auto, cpu, cuda, cuda:1, ...)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device} requested, but torch sees no CUDA device: use auto or cpu")
    return device


def host_buffer(nbytes: int) -> torch.Tensor:
    """An uninitialised uint8 host buffer, pinned where a CUDA device can copy from or into it asynchronously
    (torch keeps freed pinned blocks for reuse, and holds one back until the copies queued on it have run)."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=torch.cuda.is_available())


@functools.cache
def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


def _uint8(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


class HostCopy:
    """Bytes on their way to the host; ``wait`` returns them once they have arrived."""

    def __init__(
        self, host: torch.Tensor, flags: torch.Tensor | None, event: torch.cuda.Event | None
    ) -> None:
        self._host = host
        self._flags = flags
        self._event = event

    def wait(self) -> tuple[memoryview, list[bool]]:
        """(the bytes, the flags that travelled with them as booleans): blocks until the copy has run."""
        if self._event is not None:
            self._event.synchronize()
        flags = [] if self._flags is None else [bool(v) for v in self._flags.tolist()]
        return self._host.numpy().data.cast("B"), flags


def to_host(t: torch.Tensor, flags: torch.Tensor | None = None) -> HostCopy:
    """Start copying the bytes of ``t`` (and a small bool tensor ``flags``, e.g. a codec's deferred checks) to
    the host. On a CUDA device: into pinned buffers on the copy stream, after the work already queued on the
    current stream, so the caller can queue more work before it waits. On the CPU: ``t`` itself, no copy."""
    data = _uint8(t)
    if data.device.type == "cpu":
        return HostCopy(data, flags, None)
    if data.device.type != "cuda":  # another accelerator: a plain synchronous copy
        return HostCopy(data.cpu(), None if flags is None else flags.cpu(), None)
    stream = _copy_stream(data.device)
    stream.wait_stream(torch.cuda.current_stream(data.device))
    host = host_buffer(data.numel())
    host_flags = None if flags is None else torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
    with torch.cuda.stream(stream):
        host.copy_(data, non_blocking=True)
        if flags is not None and host_flags is not None:
            host_flags.copy_(flags, non_blocking=True)
            flags.record_stream(stream)
        event = torch.cuda.Event()
        event.record(stream)
    data.record_stream(stream)  # its memory is not reused before the copy stream has read it
    return HostCopy(host, host_flags, event)


class DeviceCopy:
    """Bytes on their way to a device; ``ready`` returns them for work queued from then on."""

    def __init__(self, data: torch.Tensor, event: torch.cuda.Event | None) -> None:
        self._data = data
        self._event = event

    def ready(self) -> torch.Tensor:
        """The bytes on the device. Work the caller queues after this call runs after the copy; the host does
        not wait."""
        if self._event is not None:
            stream = torch.cuda.current_stream(self._data.device)
            stream.wait_event(self._event)
            self._data.record_stream(stream)
        return self._data


def to_device(payload: Bytes, device: torch.device) -> DeviceCopy:
    """Start copying host bytes to ``device``: on a CUDA device through a pinned buffer on the copy stream
    (the host goes on at once); on the CPU the bytes themselves, viewed read-only (decoders never write their
    input)."""
    view = memoryview(payload).cast("B")
    if not len(view):
        return DeviceCopy(torch.empty(0, dtype=torch.uint8, device=device), None)
    with warnings.catch_warnings():  # torch warns that the buffer is read-only; it is never written
        warnings.simplefilter("ignore", UserWarning)
        src = torch.frombuffer(view, dtype=torch.uint8)
    if device.type == "cpu":
        return DeviceCopy(src, None)
    if device.type != "cuda":
        return DeviceCopy(src.to(device), None)
    host = host_buffer(len(view))
    host.copy_(src)
    stream = _copy_stream(device)
    with torch.cuda.stream(stream):
        data = torch.empty(len(view), dtype=torch.uint8, device=device)
        data.copy_(host, non_blocking=True)
        event = torch.cuda.Event()
        event.record(stream)
    return DeviceCopy(data, event)


def ahead(items: Iterable[T], stage: Callable[[T], S]) -> Iterator[S]:
    """``map(stage, items)``, with item i+1 staged before item i is handed on (double buffering): when
    ``stage`` starts asynchronous copies, the next item's copies run while the caller works on this one. Two
    items are staged at a time, never more."""
    it = iter(items)
    for first in it:
        pending = stage(first)
        break
    else:
        return
    for item in it:
        following = stage(item)
        yield pending
        pending = following
    yield pending

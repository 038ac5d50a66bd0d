"""Connect to the broker named by a URL; the rest of fedq sees only the ``Transport`` interface.

``amqp://`` and ``amqps://`` URLs give the RabbitMQ transport; ``memory://[USER@]NAME`` gives an in-process
broker shared by every transport connected with the same NAME (unit tests and single-process demos).
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

from fedq.transport.base import Delivery, Transport

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"

__all__ = ["DEFAULT_URL", "Delivery", "Transport", "connect", "default_url"]


def default_url() -> str:
    return os.environ.get("FEDQ_AMQP_URL") or DEFAULT_URL


def connect(url: str | None = None, **options: Any) -> Transport:
    """Open a transport; ``options`` go to the implementation (``window_messages``, ``window_bytes``, ...)."""
    url = url or default_url()
    parts = urlsplit(url)
    if parts.scheme == "memory":
        from fedq.transport.memory import MemoryTransport, named_broker

        return MemoryTransport(named_broker(parts.hostname or ""), user=parts.username or "guest", **options)
    from fedq.transport.rabbitmq import RabbitTransport

    return RabbitTransport(url, **options)

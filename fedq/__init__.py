"""fedq: federated learning of large language models over RabbitMQ.

The path of one update: client state dict -> codec per tensor -> chunks (wire format) -> transport
(publisher confirms, backpressure) -> RabbitMQ -> aggregator (validate, stage, fold, step) -> new global
model version streamed back to clients.

``fedq.Client`` is the drop-in API for an existing training loop (see ``fedq.client``).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Client"]


def __getattr__(name: str) -> Any:
    # Imported on first use: `import fedq.errors` (or the CLI's --help) should not pay for torch and pika.
    if name == "Client":
        from fedq.client import Client

        return Client
    raise AttributeError(f"module 'fedq' has no attribute {name!r}")

"""fedq: federated learning of large language models over RabbitMQ.

The path of one update: client state dict -> codec per tensor -> chunks (wire format) -> transport
(publisher confirms, backpressure) -> RabbitMQ -> aggregator (validate, stage, fold, step) -> new global
model version streamed back to clients.
"""

__version__ = "0.1.0"

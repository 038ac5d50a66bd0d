"""Every Prometheus metric fedq exports, in one place.

Names follow Prometheus conventions (``fedq_`` prefix, base units, ``_total`` for counters). Labels are
bounded: role, codec, reason, queue, shard, client name (one per enrolled client) - never update ids or tensor
names. Workers serve them with ``serve(port, namespace)``; port 0 means off. Every ``fedq_*`` series served
carries a ``namespace`` label (one process belongs to one federation), so federations sharing a Prometheus
stay apart. A program using ``fedq.Client`` serves its metrics the same way:
``fedq.metrics.serve(9111, namespace="prod")``. Label values that form a small fixed set are
created at import (at zero), so a dashboard shows "nothing happened" as a zero line, not as missing data.
"""

from __future__ import annotations

import os
import resource
import sys
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.metrics_core import Metric

ROLES = ("client", "aggregator", "demo", "bench")

# Bandwidth and compression ------------------------------------------------------------------------
WIRE_BYTES = Counter("fedq_wire_bytes", "Bytes of fedq messages on the wire.", ["role", "direction", "codec"])
FP32_BYTES = Counter(
    "fedq_fp32_equivalent_bytes",
    "Bytes the same tensors would take as raw float32 (the uncompressed reference).",
    ["role", "direction", "codec"],
)

# Messages -----------------------------------------------------------------------------------------
CHUNKS = Counter("fedq_chunks", "Chunk messages by what happened to them.", ["role", "event"])
# event: published | confirmed | received | folded | duplicate | staged
UPDATES = Counter("fedq_updates", "Updates by what happened to them.", ["role", "event"])
# event: published | committed | folded | dropped_incomplete
REJECTED = Counter("fedq_rejected", "Messages or updates refused, by reason.", ["role", "reason"])
DEAD_LETTERED = Counter(
    "fedq_dead_lettered", "Messages moved to the dead-letter exchange.", ["role", "reason"]
)

# Flow control -------------------------------------------------------------------------------------
CONFIRM_LATENCY = Histogram(
    "fedq_publish_confirm_seconds",
    "Time from publish to broker confirm.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
BLOCKED_CAUSES = ("window_full", "queue_full", "broker_alarm")
BLOCKED_SECONDS = Counter(
    "fedq_publisher_blocked_seconds", "Time publishers spent waiting, by cause.", ["cause"]
)
for _cause in BLOCKED_CAUSES:
    BLOCKED_SECONDS.labels(_cause)
BROKER_BLOCKED = Counter("fedq_broker_blocked", "connection.blocked notifications received (broker alarms).")
IN_FLIGHT = Gauge("fedq_publish_in_flight_messages", "Published messages awaiting a confirm.")
PREFETCH_IN_USE = Gauge(
    "fedq_consumer_unacked_messages", "Deliveries held and not yet acknowledged.", ["queue"]
)
PREFETCH_LIMIT = Gauge(
    "fedq_consumer_prefetch_messages", "Prefetch (unacked deliveries allowed) of a consumer.", ["queue"]
)
RECONNECTS = Counter("fedq_reconnects", "Broker connections re-established after a loss.", ["role"])

# Aggregation --------------------------------------------------------------------------------------
FOLDED_PARAMS = Counter(
    "fedq_folded_parameters", "Parameters decoded and folded into the accumulator.", ["device"]
)
FOLD_SECONDS = Counter("fedq_fold_seconds", "Time spent decoding and folding chunks.", ["device"])
MODEL_VERSION = Gauge("fedq_model_version", "Current global model version.", ["shard"])
MODEL_VERSION_TIME = Gauge(
    "fedq_model_version_timestamp_seconds", "Unix time the current version was made.", ["shard"]
)
UPDATES_PER_VERSION = Gauge(
    "fedq_updates_per_version", "Updates folded into the last version step.", ["shard"]
)
UPDATES_WAITING = Gauge(
    "fedq_updates_waiting",
    "Complete updates the leader holds that no version has taken yet (a version that never comes shows).",
)
VERSION_SECONDS = Histogram(
    "fedq_version_duration_seconds",
    "Time between consecutive model versions.",
    buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
)
STALENESS = Histogram(
    "fedq_update_staleness_versions",
    "Staleness (versions) of folded updates.",
    buckets=(0, 1, 2, 3, 4, 6, 8, 12, 16, 32),
)
STAGED_BYTES = Gauge(
    "fedq_staged_bytes", "Bytes of committed-pending update chunks staged (memory + disk).", ["where"]
)

# Processes ----------------------------------------------------------------------------------------
PEAK_RSS = Gauge("fedq_process_peak_rss_bytes", "Peak resident set size of this process.", ["role"])
MEMORY_BUDGET = Gauge(
    "fedq_process_memory_budget_bytes",
    "Memory this whole process may use: its configured process budget, else its container limit or physical "
    "memory (never a budget of in-flight messages).",
    ["role"],
)
PEAK_GPU = Gauge("fedq_process_peak_gpu_bytes", "Peak CUDA memory allocated by this process.", ["role"])

# Clients ------------------------------------------------------------------------------------------
CLIENT_METRIC = Gauge(
    "fedq_client_metric", "Training metrics clients report with their updates.", ["client", "metric"]
)
CLIENT_LAST_UPDATE = Gauge(
    "fedq_client_last_update_timestamp_seconds", "When a client's last update was folded.", ["client"]
)
DP_EPSILON = Gauge(
    "fedq_dp_epsilon", "Central DP: epsilon spent so far at fedq_dp_delta (the leader's accountant)."
)
DP_DELTA = Gauge("fedq_dp_delta", "Central DP: the delta at which epsilon is reported.")
DP_BUDGET = Gauge("fedq_dp_epsilon_budget", "Central DP: the epsilon budget (0 = none).")
VALIDATION_LOSS = Gauge("fedq_validation_loss", "Validation loss of the global model (demo).", ["role"])


def peak_rss_bytes() -> int:
    """This process's peak RSS.

    Linux's ``VmHWM`` first: ``ru_maxrss`` survives exec, so a worker started by a large parent (the demo
    launcher, a benchmark) would report the parent's peak. ``ru_maxrss`` (KiB on Linux, bytes on macOS)
    elsewhere.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def current_rss_bytes() -> int:
    """This process's current RSS, read from /proc (0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except OSError:
        return 0
    return pages * resource.getpagesize()


def _cgroup_limit_bytes() -> int | None:
    """The memory limit of this process's container, if it has one (cgroup v2, then v1)."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # "max" or a near-2**63 value means unlimited
            return int(text)
    return None


def default_memory_budget_bytes() -> int:
    """What a worker without an explicit budget can use before the kernel kills it: the container limit, if
    smaller than physical memory. Exporting it lets the near-budget alert work for every worker."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = _cgroup_limit_bytes()
    return min(physical, limit) if limit else physical


def record_process(role: str, budget_bytes: int | None = None) -> None:
    """Export this process's peak RSS, memory budget and (where CUDA is present) peak GPU memory.

    The gauges are computed at each scrape, so one call at start-up keeps them current; calling again (e.g.
    with a different budget) is harmless.
    """
    PEAK_RSS.labels(role).set_function(peak_rss_bytes)
    MEMORY_BUDGET.labels(role).set(budget_bytes if budget_bytes else default_memory_budget_bytes())
    import torch

    if torch.cuda.is_available():
        PEAK_GPU.labels(role).set_function(torch.cuda.max_memory_allocated)


class _WithNamespace:
    """The default registry's metrics, every ``fedq_*`` sample labelled with the process's namespace."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace

    def collect(self) -> Iterator[Metric]:
        for family in REGISTRY.collect():
            if family.name.startswith("fedq_"):
                family.samples = [
                    s._replace(labels={**s.labels, "namespace": self.namespace}) for s in family.samples
                ]
            yield family


def serve(port: int, namespace: str | None = None) -> None:
    """Serve /metrics on ``port`` (0 = off), ``fedq_*`` series labelled with ``namespace`` when given."""
    if port:
        start_http_server(port, registry=_WithNamespace(namespace) if namespace else REGISTRY)

"""fedq.metrics: names and labels follow the conventions, process gauges are live, /metrics is served."""

from __future__ import annotations

import socket
import urllib.request

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fedq import metrics

# Labels whose values come from a small set, or one value per enrolled client / shard / queue of a federation.
BOUNDED_LABELS = {
    "role",
    "direction",
    "codec",
    "event",
    "reason",
    "cause",
    "queue",
    "device",
    "shard",
    "where",
}
BOUNDED_LABELS |= {"client", "metric"}


def fedq_metrics() -> dict[str, Counter | Gauge | Histogram]:
    return {
        name: value for name, value in vars(metrics).items() if isinstance(value, Counter | Gauge | Histogram)
    }


def exposition() -> dict[str, list[tuple[dict[str, str], float]]]:
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(generate_latest(REGISTRY).decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def test_names_follow_prometheus_conventions_and_labels_are_bounded() -> None:
    found = fedq_metrics()
    assert len(found) >= 25
    for attribute, metric in found.items():
        name = metric._name
        assert name.startswith("fedq_"), attribute
        assert not name.endswith("_total"), f"{name}: prometheus_client appends _total to counters"
        assert set(metric._labelnames) <= BOUNDED_LABELS, f"{name}: unbounded label in {metric._labelnames}"
    assert len({m._name for m in found.values()}) == len(found)


def test_every_quantity_the_issue_lists_has_a_metric() -> None:
    names = {m._name for m in fedq_metrics().values()}
    assert {
        "fedq_wire_bytes",
        "fedq_fp32_equivalent_bytes",
        # the compression ratio is fp32-equivalent / wire bytes of these two counters (the dashboard's panel)
        "fedq_chunks",
        "fedq_updates",
        "fedq_rejected",
        "fedq_dead_lettered",
        "fedq_publish_confirm_seconds",
        "fedq_publisher_blocked_seconds",
        "fedq_consumer_unacked_messages",
        "fedq_consumer_prefetch_messages",
        "fedq_folded_parameters",
        "fedq_fold_seconds",
        "fedq_model_version",
        "fedq_updates_per_version",
        "fedq_update_staleness_versions",
        "fedq_process_peak_rss_bytes",
        "fedq_process_peak_gpu_bytes",
        "fedq_version_duration_seconds",
        "fedq_client_metric",
    } <= names


def test_blocked_causes_are_exported_at_zero_before_any_wait() -> None:
    blocked = {
        labels["cause"]: value for labels, value in exposition()["fedq_publisher_blocked_seconds_total"]
    }
    assert set(blocked) == set(metrics.BLOCKED_CAUSES)
    assert all(value >= 0 for value in blocked.values())


def test_process_gauges_follow_the_process_at_each_scrape() -> None:
    metrics.record_process("bench", budget_bytes=123 << 20)
    rss = metrics.current_rss_bytes()
    before = dict((lab["role"], v) for lab, v in exposition()["fedq_process_peak_rss_bytes"])["bench"]
    # the kernel batches RSS counters per thread: the peak it reports may trail /proc's count by a few pages
    assert 0.95 * rss <= before <= metrics.peak_rss_bytes()
    # touch 256 MiB more than the peak so far: the gauge must rise without another record_process call
    # (earlier tests in the same process may have left the peak well above the current RSS)
    grown = bytearray(max(0, metrics.peak_rss_bytes() - rss) + (256 << 20))
    grown[::4096] = b"x" * len(grown[::4096])
    after = dict((lab["role"], v) for lab, v in exposition()["fedq_process_peak_rss_bytes"])["bench"]
    assert after >= before + (200 << 20)
    budget = dict((lab["role"], v) for lab, v in exposition()["fedq_process_memory_budget_bytes"])
    assert budget["bench"] == 123 << 20


def test_without_a_budget_the_limit_is_the_machine_or_container_memory() -> None:
    metrics.record_process("demo")
    budget = dict((lab["role"], v) for lab, v in exposition()["fedq_process_memory_budget_bytes"])["demo"]
    with open("/proc/meminfo") as f:
        physical = int(f.readline().split()[1]) * 1024
    assert 0 < budget <= physical


def test_serve_exposes_the_registry_over_http() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    metrics.serve(port)
    metrics.REJECTED.labels("aggregator", "checksum").inc(3)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    rejected = {
        s.labels["reason"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "fedq_rejected_total" and s.labels["role"] == "aggregator"
    }
    assert rejected["checksum"] >= 3

"""The state of a federation on one screen, for an operator.

The broker knows the queues and the dead letters; only the workers know the model version and which clients
reported, so both are read: the management API, and the ``/metrics`` of the workers (``--metrics-url``).
Dead letters are counted by reason from their ``x-fedq-reason`` header by peeking at them with a get that
requeues (``ack_requeue_true``): looking must not consume what an operator may still want to inspect.
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, TextIO

from prometheus_client.parser import text_string_to_metric_families

from fedq.broker import Management, management_url_for, q, vhost_of
from fedq.errors import StreamError
from fedq.protocol import Announcement
from fedq.topology import Names, versions_names
from fedq.transport.base import REASON_HEADER


@dataclass(frozen=True)
class QueueState:
    name: str
    kind: str
    ready: int
    unacked: int
    consumers: int


@dataclass(frozen=True)
class VersionState:
    shard: str
    version: int
    made_at: float  # unix time; 0 when the worker has not stepped yet


@dataclass
class ClientState:
    name: str
    last_update: float  # unix time the aggregator folded its last update
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class DeadLetters:
    count: int
    reasons: Counter[str]  # of the messages inspected, which may be fewer than ``count``


@dataclass
class WorkerReport:
    """What the workers' /metrics say; ``errors`` lists the URLs that could not be read, and why."""

    versions: list[VersionState] = field(default_factory=list)
    clients: dict[str, ClientState] = field(default_factory=dict)
    privacy: dict[str, float] = field(default_factory=dict)  # fedq_dp_epsilon, _delta, _epsilon_budget
    waiting: int | None = None  # complete updates no version has taken yet (the leader's)
    errors: list[str] = field(default_factory=list)


def run(args: argparse.Namespace) -> int:
    management = Management(args.management_url or management_url_for(args.amqp_url))
    vhost = vhost_of(args.amqp_url)
    names = Names(args.namespace)
    queues = queue_states(management, vhost, args.namespace)
    dead = next((s for s in queues if s.name == names.dead_letter_queue), None)
    dead_letters = dead_letter_state(management, vhost, dead, args.peek)
    workers = read_workers(args.metrics_url)
    _, versions = versions_names(names)
    newest = newest_version(args.amqp_url, names) if any(s.name == versions for s in queues) else None
    print(f"federation {args.namespace} on {management.base} (vhost {vhost})")
    print_report(sys.stdout, args.namespace, queues, dead_letters, workers, args.top, time.time())
    print_contributors(sys.stdout, newest, args.top_contributors)
    return 1 if workers.errors else 0


def newest_version(amqp_url: str, names: Names) -> Announcement | None:
    """The newest announced version (from the versions stream), None when none is announced yet."""
    from fedq.results import newest_announcement
    from fedq.transport import connect

    with connect(amqp_url, connect_timeout=0) as transport:
        try:
            return newest_announcement(transport, names, timeout=2.0)
        except StreamError:
            return None


def print_contributors(out: TextIO, newest: Announcement | None, top: int) -> None:
    """Who made the newest version: validated broker user, update id, weight, staleness."""
    print(file=out)
    if newest is None:
        print("newest announced version: none yet", file=out)
        return
    rows = newest.contributors
    print(f"newest announced version {newest.version}: {len(rows)} contributing updates", file=out)
    for row in rows[:top]:
        weight = float(row.get("weight", 0))
        clipped = "  (clipped)" if row.get("clipped") else ""
        print(
            f"  {row.get('client')}  update {row.get('update_id')}  weight {weight:.4g}  "
            f"staleness {row.get('staleness')}{clipped}",
            file=out,
        )
    if len(rows) > top:
        print(f"  ... and {len(rows) - top} more (fedq export writes them all into the model file)", file=out)


def queue_states(management: Management, vhost: str, namespace: str) -> list[QueueState]:
    """The namespace's queues and their depths as of the broker's last statistics update (seconds old)."""
    columns = "name,type,messages_ready,messages_unacknowledged,consumers"
    rows = management.get(f"/queues/{q(vhost)}?columns={columns}")
    return sorted(
        (
            QueueState(
                name=row["name"],
                kind=row.get("type", "classic"),
                ready=int(row.get("messages_ready") or 0),
                unacked=int(row.get("messages_unacknowledged") or 0),
                consumers=int(row.get("consumers") or 0),
            )
            for row in rows
            if row["name"].startswith(namespace + ".")
        ),
        key=lambda s: s.name,
    )


def dead_letter_state(management: Management, vhost: str, queue: QueueState | None, peek: int) -> DeadLetters:
    """Count the dead letters and the reasons of up to ``peek`` of them; they are requeued, so the queue is
    left as it was. The get's own message count is exact where the queue statistics can be seconds old."""
    if queue is None:
        return DeadLetters(0, Counter())
    count = queue.ready + queue.unacked
    if peek <= 0:
        return DeadLetters(count, Counter())
    body = {"count": peek, "ackmode": "ack_requeue_true", "encoding": "auto", "truncate": 64}
    messages = management.post(f"/queues/{q(vhost)}/{q(queue.name)}/get", body) or []
    if messages:
        count = max(count, int(messages[0].get("message_count", 0)) + 1 + queue.unacked)
    return DeadLetters(count, Counter(reason_of(m.get("properties") or {}) for m in messages))


def reason_of(properties: dict[str, Any]) -> str:
    """fedq's reason header, else the x-death reason (expired, maxlen...) of what the broker dead-lettered."""
    headers = properties.get("headers") or {}
    if REASON_HEADER in headers:
        return str(headers[REASON_HEADER])
    deaths = headers.get("x-death") or []
    if deaths and isinstance(deaths[0], dict) and "reason" in deaths[0]:
        return f"broker:{deaths[0]['reason']}"
    return "unknown"


def metrics_endpoint(url: str) -> str:
    """Accept ``host:port`` as well as a full URL; the path defaults to /metrics."""
    if "://" not in url:
        url = "http://" + url
    scheme, _, rest = url.partition("://")
    return url if "/" in rest else f"{scheme}://{rest}/metrics"


def read_workers(urls: list[str], timeout: float = 5.0) -> WorkerReport:
    report = WorkerReport()
    for url in urls:
        endpoint = metrics_endpoint(url)
        try:
            with urllib.request.urlopen(endpoint, timeout=timeout) as response:
                text = response.read().decode()
            add_samples(report, text)
        except (OSError, ValueError) as exc:  # unreachable, or not a Prometheus exposition
            report.errors.append(f"{endpoint}: {exc}")
    return report


def add_samples(report: WorkerReport, text: str) -> None:
    """Fold one worker's exposition into the report (several aggregator shards each add their versions)."""
    versions: dict[str, int] = {}
    made_at: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "fedq_model_version":
                versions[labels.get("shard", "0")] = int(sample.value)
            elif sample.name == "fedq_model_version_timestamp_seconds":
                made_at[labels.get("shard", "0")] = sample.value
            elif sample.name == "fedq_client_last_update_timestamp_seconds":
                client = report.clients.setdefault(labels["client"], ClientState(labels["client"], 0.0))
                client.last_update = max(client.last_update, sample.value)
            elif sample.name == "fedq_updates_waiting":  # the leader's; every other process exports 0
                report.waiting = max(report.waiting or 0, int(sample.value))
            elif sample.name in ("fedq_dp_epsilon", "fedq_dp_delta", "fedq_dp_epsilon_budget"):
                report.privacy[sample.name] = sample.value
            elif sample.name == "fedq_client_metric":
                client = report.clients.setdefault(labels["client"], ClientState(labels["client"], 0.0))
                client.metrics[labels["metric"]] = sample.value
    for shard, version in versions.items():
        report.versions.append(VersionState(shard, version, made_at.get(shard, 0.0)))


def ago(then: float, now: float) -> str:
    if then <= 0:
        return "never"
    seconds = max(0, int(now - then))
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    return f"{seconds // 3600}h ago"


def print_report(
    out: TextIO,
    namespace: str,
    queues: list[QueueState],
    dead_letters: DeadLetters,
    workers: WorkerReport,
    top: int,
    now: float,
) -> None:
    print(file=out)
    if queues:
        width = max(len("queue"), *(len(s.name) for s in queues))
        print(f"{'queue':<{width}}  {'type':<8} {'ready':>9} {'unacked':>9} {'consumers':>9}", file=out)
        for s in queues:
            print(f"{s.name:<{width}}  {s.kind:<8} {s.ready:>9} {s.unacked:>9} {s.consumers:>9}", file=out)
    else:
        print(f"no queues named {namespace}.* (is the namespace right? has a worker started?)", file=out)
    print(file=out)
    if workers.versions:
        for v in sorted(workers.versions, key=lambda v: v.shard):
            print(f"model version {v.version} (shard {v.shard}), made {ago(v.made_at, now)}", file=out)
    else:
        print("model version: unknown (give an aggregator's --metrics-url)", file=out)
    if workers.waiting is not None:
        print(
            f"updates waiting for a version: {workers.waiting} (a fedbuff version takes --buffer-size of "
            "them, a client sends one per version: more than the clients never comes)",
            file=out,
        )
    if workers.privacy.get("fedq_dp_delta"):  # only a leader with central DP sets delta
        p = workers.privacy
        spent, delta, budget = (
            p.get("fedq_dp_epsilon", 0.0),
            p["fedq_dp_delta"],
            p.get("fedq_dp_epsilon_budget"),
        )
        limit = f" of a budget of {budget:.4g}" if budget else " (no budget)"
        print(f"differential privacy: epsilon {spent:.4g} at delta {delta:g}{limit}", file=out)
    print(f"clients seen: {len(workers.clients)}", file=out)
    for c in sorted(workers.clients.values(), key=lambda c: c.name):
        metrics = "  ".join(f"{k}={v:.4g}" for k, v in sorted(c.metrics.items()))
        print(f"  {c.name}  last update {ago(c.last_update, now)}  {metrics}".rstrip(), file=out)
    print(file=out)
    print(f"dead letters: {dead_letters.count}", file=out)
    if dead_letters.reasons:
        inspected = sum(dead_letters.reasons.values())
        print(f"  most common reasons (of {inspected} inspected):", file=out)
        for reason, count in dead_letters.reasons.most_common(top):
            print(f"  {count:>6}  {reason}", file=out)
    for error in workers.errors:
        print(f"could not read metrics: {error}", file=out)

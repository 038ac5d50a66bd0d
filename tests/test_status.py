"""``fedq status`` against the real broker (queues, dead letters) and a real metrics endpoint."""

from __future__ import annotations

import io
import re
import time
from collections import Counter
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from fedq import cli, status
from fedq.broker import Management, q
from fedq.topology import Names


def publish(management: Management, vhost: str, queue: str, headers: dict[str, object]) -> None:
    body = {
        "properties": {"headers": headers},
        "routing_key": queue,
        "payload": "x",
        "payload_encoding": "string",
    }
    assert management.post(f"/exchanges/{q(vhost)}/amq.default/publish", body) == {"routed": True}


def wait_for_depths(management: Management, vhost: str, expected: dict[str, int]) -> None:
    """Queue statistics lag by a few seconds and the report reads them: wait until they are current."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rows = management.get(f"/queues/{q(vhost)}?columns=name,messages_ready")
        depths = {row["name"]: row.get("messages_ready") for row in rows if row["name"] in expected}
        if depths == expected:
            return
        time.sleep(0.5)
    raise AssertionError(f"queue statistics never showed {expected}, last {depths}")


@pytest.fixture
def worker_metrics() -> Iterator[tuple[str, float]]:
    """A metrics endpoint with what an aggregator exports, served by prometheus_client as workers do."""
    registry = CollectorRegistry()
    Gauge("fedq_model_version", "", ["shard"], registry=registry).labels("0").set(7)
    made = Gauge("fedq_model_version_timestamp_seconds", "", ["shard"], registry=registry)
    made.labels("0").set(time.time() - 30)
    last = Gauge("fedq_client_last_update_timestamp_seconds", "", ["client"], registry=registry)
    last.labels("alice").set(time.time() - 5)
    last.labels("bob").set(time.time() - 600)
    Gauge("fedq_client_metric", "", ["client", "metric"], registry=registry).labels(
        "alice", "local_loss"
    ).set(2.5)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    yield f"127.0.0.1:{server.server_port}", time.time()
    server.shutdown()
    thread.join(5)


@pytest.mark.broker
def test_status_reports_queues_versions_clients_and_dead_letter_reasons(
    management: Management,
    vhost: str,
    namespace: str,
    amqp_url: str,
    worker_metrics: tuple[str, float],
    capsys,
) -> None:
    names = Names(namespace)
    updates, dead = names.updates_queue(0), names.dead_letter_queue
    for queue in (updates, dead):
        management.put(f"/queues/{q(vhost)}/{q(queue)}", {"durable": False, "auto_delete": False})
    for _ in range(2):
        publish(management, vhost, updates, {})
    for reason in ("stale", "wire", "stale"):
        publish(management, vhost, dead, {"x-fedq-reason": reason, "x-fedq-detail": "test"})
    publish(management, vhost, dead, {"x-death": [{"reason": "expired", "queue": updates, "count": 1}]})
    wait_for_depths(management, vhost, {updates: 2, dead: 4})

    url, served_at = worker_metrics
    assert cli.main(["status", "--amqp-url", amqp_url, "--namespace", namespace, "--metrics-url", url]) == 0
    waited = time.time() - served_at
    out = capsys.readouterr().out

    rows = {
        line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith(namespace + ".")
    }
    assert rows == {updates: ["classic", "2", "0", "0"], dead: ["classic", "4", "0", "0"]}
    made = re.search(r"^model version 7 \(shard 0\), made (\d+)s ago$", out, re.M)
    assert made and 29 <= int(made[1]) <= 31 + waited, out
    assert "clients seen: 2" in out
    alice = re.search(r"^  alice  last update (\d+)s ago  local_loss=2\.5$", out, re.M)
    assert alice and 4 <= int(alice[1]) <= 6 + waited, out
    assert re.search(r"^  bob  last update 10m ago$", out, re.M), out
    assert "dead letters: 4" in out
    reasons = re.findall(r"^\s+(\d+)  (\S+)$", out, re.M)
    assert reasons == [("2", "stale"), ("1", "wire"), ("1", "broker:expired")], out

    # Peeking requeued the dead letters: all four are still there, for the operator to inspect.
    left = management.post(
        f"/queues/{q(vhost)}/{q(dead)}/get", {"count": 10, "ackmode": "ack_requeue_true", "encoding": "auto"}
    )
    assert len(left) == 4


@pytest.mark.broker
def test_status_fails_when_a_worker_cannot_be_read(amqp_url: str, namespace: str, capsys) -> None:
    args = ["status", "--amqp-url", amqp_url, "--namespace", namespace, "--metrics-url", "127.0.0.1:9"]
    assert cli.main(args) == 1
    out = capsys.readouterr().out
    assert f"no queues named {namespace}.*" in out
    assert "could not read metrics: http://127.0.0.1:9/metrics" in out


def test_status_fails_cleanly_without_a_management_api(capsys) -> None:
    args = ["status", "--management-url", "http://guest:guest@127.0.0.1:9", "--namespace", "x"]
    assert cli.main(args) == 3  # the broker's exit code
    err = capsys.readouterr().err
    assert err.startswith("fedq status: error: ") and len(err.splitlines()) == 1, err


def test_shards_of_several_aggregators_are_all_reported() -> None:
    report = status.WorkerReport()
    status.add_samples(
        report, 'fedq_model_version{shard="0"} 3\nfedq_model_version_timestamp_seconds{shard="0"} 100\n'
    )
    status.add_samples(report, 'fedq_model_version{shard="1"} 3\n')
    assert report.versions == [status.VersionState("0", 3, 100.0), status.VersionState("1", 3, 0.0)]


def test_updates_waiting_for_a_version_are_shown() -> None:
    # The walk of 2026-11-29: three clients and --buffer-size 4 (the default) never made version 1, and
    # `fedq status` showed nothing amiss; the leader now exports how many complete updates wait.
    report = status.WorkerReport()
    status.add_samples(report, 'fedq_model_version{shard="0"} 0\nfedq_updates_waiting 3\n')
    status.add_samples(report, 'fedq_model_version{shard="1"} 0\nfedq_updates_waiting 0\n')  # a follower
    out = io.StringIO()
    status.print_report(out, "ns", [], status.DeadLetters(0, Counter()), report, top=5, now=0.0)
    assert "updates waiting for a version: 3 (a fedbuff version takes --buffer-size of" in out.getvalue()


@pytest.mark.parametrize(
    ("given", "endpoint"),
    [
        ("localhost:9101", "http://localhost:9101/metrics"),
        ("http://10.0.0.2:9101", "http://10.0.0.2:9101/metrics"),
        ("https://agg.example/custom/metrics", "https://agg.example/custom/metrics"),
    ],
)
def test_metrics_endpoint_accepts_host_port(given: str, endpoint: str) -> None:
    assert status.metrics_endpoint(given) == endpoint

"""Broker users as ``fedq broker`` manages them, on the real broker: fedq creates users tagged as its own,
changes or removes only those, limits clients' connections, confines aggregators to their shard, and tears a
namespace down."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fedq import cli
from fedq.broker import Management, fedq_role, find_user, q
from fedq.errors import TransportError
from fedq.topology import Names, versions_names
from fedq.transport import connect

pytestmark = pytest.mark.broker


def broker(amqp_url: str, names: Names, *argv: str) -> list[str]:
    return ["broker", *argv, "--amqp-url", amqp_url, "--namespace", names.namespace]


def one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture
def topology(amqp_url: str, names: Names) -> Names:
    with connect(amqp_url) as operator:
        operator.declare(names, 2)
    return names


def test_add_client_never_changes_a_user_it_did_not_make_and_rotates_only_when_asked(
    amqp_url: str, management: Management, topology: Names, capsys: pytest.CaptureFixture[str]
) -> None:
    alice = f"{topology.namespace}-alice"
    assert cli.main(broker(amqp_url, topology, "add-client", alice)) == 0
    made = capsys.readouterr()
    first_url = made.out.strip()  # the URL alone on stdout; which namespace it is for on stderr
    assert f"namespace {topology.namespace!r}" in made.err
    user = find_user(management, alice)
    assert user is not None and fedq_role(user) == ("client", topology.namespace)
    limits = management.get(f"/user-limits/{q(alice)}")
    assert limits[0]["value"] == {"max-connections": 4, "max-channels": 32}

    assert cli.main(broker(amqp_url, topology, "add-client", alice)) == 2
    assert "exists" in one_line(capsys) and "--rotate" in capsys.readouterr().err + "--rotate"
    connect(first_url, connect_timeout=0).close()  # its password is unchanged

    assert cli.main(broker(amqp_url, topology, "add-client", alice, "--rotate")) == 0
    rotated = capsys.readouterr().out.strip()
    assert rotated != first_url
    connect(rotated, connect_timeout=0).close()
    with pytest.raises(TransportError) as refused:
        connect(first_url, connect_timeout=0)
    assert refused.value.reason == "auth"

    # Someone else's user (here: made without fedq) is left exactly as it was.
    admin = f"{topology.namespace}-admin"
    management.put(f"/users/{q(admin)}", {"password": "x", "tags": "administrator"})
    for command in (["add-client", admin], ["add-client", admin, "--rotate"], ["add-aggregator", admin]):
        assert cli.main(broker(amqp_url, topology, *command)) == 2
        assert "not created by fedq" in one_line(capsys)
    assert cli.main(broker(amqp_url, topology, "remove-client", admin)) == 2
    assert "not created by fedq" in one_line(capsys)
    assert find_user(management, admin)["tags"] in (["administrator"], "administrator")  # type: ignore[index]

    assert cli.main(broker(amqp_url, topology, "remove-client", f"{topology.namespace}-nobody")) == 2
    assert "no broker user" in one_line(capsys)
    assert cli.main(broker(amqp_url, topology, "remove-client", alice)) == 0
    assert find_user(management, alice) is None


def test_a_client_holds_at_most_its_connection_limit(
    amqp_url: str, topology: Names, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bob = f"{topology.namespace}-bob"
    url_file = tmp_path / "bob.url"
    command = ["add-client", bob, "--max-connections", "2", "--url-file", str(url_file)]
    assert cli.main(broker(amqp_url, topology, *command)) == 0
    assert str(url_file) in capsys.readouterr().out and oct(url_file.stat().st_mode & 0o777) == "0o600"
    url = url_file.read_text().strip()
    held = [connect(url, connect_timeout=0) for _ in range(2)]
    try:
        with pytest.raises(TransportError) as refused:
            connect(url, connect_timeout=0)
        assert refused.value.reason == "limit" and "connection limit" in str(refused.value)
    finally:
        for transport in held:
            transport.close()


def test_an_aggregator_user_serves_its_shard_only(
    amqp_url: str, topology: Names, capsys: pytest.CaptureFixture[str]
) -> None:
    user = f"{topology.namespace}-agg0"
    assert cli.main(broker(amqp_url, topology, "add-aggregator", user, "--shard", "0")) == 0
    url = capsys.readouterr().out.strip()
    with connect(url, connect_timeout=0) as aggregator:
        aggregator.declare(topology, 2)  # what a worker does at start-up
        aggregator.consume(topology.updates_queue(0), prefetch=1, exclusive=True)
        aggregator.consume(topology.control_queue(0), prefetch=1, exclusive=True)
        for exchange in (topology.models_exchange, topology.control_exchange, topology.dead_letter_exchange):
            aggregator.publish(exchange, topology.shard_key(1), b"allowed")
        aggregator.flush()
    for refused_action in ("consume another shard", "publish an update"):
        with connect(url, connect_timeout=0) as aggregator, pytest.raises(TransportError) as refused:
            if refused_action == "consume another shard":
                aggregator.consume(topology.updates_queue(1), prefetch=1)
            else:
                aggregator.publish(topology.updates_exchange, topology.shard_key(0), b"forged")
                aggregator.flush()
        assert refused.value.reason == "access_refused", refused_action


def test_teardown_deletes_a_namespace_and_only_fedq_users_of_it(
    amqp_url: str, management: Management, vhost: str, topology: Names, capsys: pytest.CaptureFixture[str]
) -> None:
    ns = topology.namespace
    assert cli.main(broker(amqp_url, topology, "add-client", f"{ns}-carol")) == 0
    assert cli.main(broker(amqp_url, topology, "add-aggregator", f"{ns}-agg")) == 0
    management.put(f"/users/{q(ns + '-other')}", {"password": "x", "tags": ""})
    capsys.readouterr()
    teardown = ["broker", "teardown", ns, "--amqp-url", amqp_url]
    with connect(amqp_url) as worker:
        worker.consume(topology.updates_queue(0), prefetch=1)
        deadline = time.monotonic() + 30  # the management API sees a new consumer within a second or two
        while time.monotonic() < deadline and ns not in str(management.get(f"/consumers/{q(vhost)}")):
            time.sleep(0.2)
        assert cli.main(teardown) == 2
        assert "have consumers" in one_line(capsys)
    assert cli.main(teardown) == 0
    out = capsys.readouterr().out
    assert f"deleted {ns}: " in out and "2 users" in out, out
    assert not [
        r for r in management.get(f"/queues/{q(vhost)}?columns=name") if r["name"].startswith(ns + ".")
    ]
    assert not [
        r for r in management.get(f"/exchanges/{q(vhost)}?columns=name") if r["name"].startswith(ns + ".")
    ]
    assert find_user(management, f"{ns}-carol") is None and find_user(management, f"{ns}-agg") is None
    assert find_user(management, f"{ns}-other") is not None


def _start_and_kill_a_waiting_client(
    amqp_url: str, management: Management, topology: Names, after: float
) -> None:
    """A client process waiting for a version, SIGKILLed ``after`` seconds once the broker lists its
    connection; returns when the broker has noticed."""
    waits = (
        "import torch, fedq; "
        f"fedq.Client('c', amqp_url={amqp_url!r}, namespace={topology.namespace!r})"
        ".receive({'w': torch.zeros(1)}, timeout=600)"
    )
    root = str(Path(__file__).parent.parent)
    client = subprocess.Popen([sys.executable, "-c", waits], env=os.environ | {"PYTHONPATH": root})
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(
            str(c.get("client_properties", {}).get("connection_name", "")).startswith(
                f"fedq-client-{client.pid}-"
            )
            for c in management.get("/connections")
        ):
            time.sleep(0.02)
        time.sleep(after)
    finally:
        client.kill()
        client.wait()
    time.sleep(3)  # the broker has noticed the closed connection


def test_teardown_is_not_blocked_by_the_stream_consumer_of_a_killed_client(
    amqp_url: str, management: Management, vhost: str, topology: Names, capsys: pytest.CaptureFixture[str]
) -> None:
    """RabbitMQ 3.10 keeps listing, without a channel, the stream consumer of a client killed while it
    started consuming: it must not block the teardown for ever."""
    versions = versions_names(topology)[1]
    left: list[dict[str, Any]] = []
    for attempt in range(6):  # the leftover comes of a race (a kill as the consumer starts): sweep the moment
        _start_and_kill_a_waiting_client(amqp_url, management, topology, after=0.1 * attempt)
        left = [c for c in management.get(f"/consumers/{q(vhost)}") if c["queue"]["name"] == versions]
        if left:
            break
    assert left and not any(c.get("channel_details") for c in left), left  # the broker's leftover
    teardown = ["broker", "teardown", topology.namespace, "--amqp-url", amqp_url]
    assert cli.main(teardown) == 0, capsys.readouterr()
    assert f"deleted {topology.namespace}: " in capsys.readouterr().out

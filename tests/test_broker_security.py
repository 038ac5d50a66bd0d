"""Clients are confined by the broker itself (issue 7, "Security"): real users, real refusals."""

from __future__ import annotations

import time
from urllib.parse import quote, urlsplit, urlunsplit

import pytest

from fedq import cli
from fedq.broker import Management, add_client, remove_client
from fedq.errors import TransportError
from fedq.topology import Names
from fedq.transport import Transport, connect

pytestmark = pytest.mark.broker


def client_url(amqp_url: str, user: str, password: str) -> str:
    parts = urlsplit(amqp_url)
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{parts.hostname}:{parts.port or 5672}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


@pytest.fixture
def topology(amqp_url: str, names: Names) -> Names:
    with connect(amqp_url) as operator:
        operator.declare(names, 1)
    return names


@pytest.fixture
def alice(amqp_url: str, management: Management, vhost: str, topology: Names) -> str:
    """A client URL for the enrolled user ``{ns}-alice`` (removed with the namespace)."""
    user = f"{topology.namespace}-alice"
    add_client(management, user, "alice-secret", namespace=topology.namespace, vhost=vhost)
    return client_url(amqp_url, user, "alice-secret")


def test_client_publishes_updates_attributed_to_its_validated_user(
    amqp_url: str, alice: str, topology: Names
) -> None:
    with connect(alice) as client:
        client.publish(topology.updates_exchange, topology.shard_key(0), b"delta")
        client.flush()
    with connect(amqp_url) as aggregator:
        aggregator.consume(topology.updates_queue(0), prefetch=1)
        delivery = aggregator.get(5.0)
        assert delivery is not None and delivery.body == b"delta"
        assert delivery.user_id == f"{topology.namespace}-alice"
        aggregator.ack(delivery)


def test_client_reads_the_model_streams(amqp_url: str, alice: str, topology: Names) -> None:
    with connect(amqp_url) as aggregator:
        aggregator.publish(topology.models_exchange, "", b"model v1")
        aggregator.flush()
    with connect(alice) as client:
        client.consume(topology.models_stream, prefetch=4, arguments={"x-stream-offset": "first"})
        delivery = client.get(5.0)
        assert delivery is not None and delivery.body == b"model v1"
        client.ack(delivery)


def _refused(action: str, client: Transport, names: Names) -> TransportError:
    with pytest.raises(TransportError) as excinfo:
        if action == "publish_model":
            client.publish(names.models_exchange, "", b"a forged global model")
            client.flush()
        elif action == "read_updates":
            client.consume(names.updates_queue(0), prefetch=1)
        elif action == "declare":
            client.declare(Names(names.namespace + "x"), 1)
        elif action == "purge_by_redeclare":
            client.declare(names, 1)
    return excinfo.value


@pytest.mark.parametrize("action", ["publish_model", "read_updates", "declare", "purge_by_redeclare"])
def test_client_is_refused(alice: str, topology: Names, action: str) -> None:
    with connect(alice) as client:
        error = _refused(action, client, topology)
        assert error.reason == "access_refused", error
        client.publish(topology.updates_exchange, topology.shard_key(0), b"still allowed")
        client.flush()


def test_client_cannot_impersonate_another(
    amqp_url: str, management: Management, vhost: str, alice: str, topology: Names
) -> None:
    bob = f"{topology.namespace}-bob"
    add_client(management, bob, "bob-secret", namespace=topology.namespace, vhost=vhost)
    client = connect(alice)
    try:
        client.user = bob  # type: ignore[attr-defined]  # a malicious client stamps another user_id
        with pytest.raises(TransportError) as excinfo:
            client.publish(topology.updates_exchange, topology.shard_key(0), b"forged")
            client.flush()
        assert excinfo.value.reason == "precondition_failed"
    finally:
        client.user = f"{topology.namespace}-alice"  # type: ignore[attr-defined]
        client.close()
    with connect(amqp_url) as aggregator:
        aggregator.consume(topology.updates_queue(0), prefetch=1)
        assert aggregator.get(1.0) is None, "the forged message must not reach the queue"


def test_remove_client_revokes(amqp_url: str, management: Management, alice: str, topology: Names) -> None:
    live = connect(alice, reconnect_timeout=5.0)
    user = f"{topology.namespace}-alice"
    deadline = time.monotonic() + 30  # the management API lists a connection once its stats come (5 s)
    while not any(c.get("user") == user for c in management.get("/connections?columns=user")):
        assert time.monotonic() < deadline, "the live connection never appeared in the management API"
        time.sleep(0.5)
    assert remove_client(management, user) == 1  # the broker closes it itself: counted (was 0)
    with pytest.raises(TransportError) as excinfo:
        connect(alice)
    assert excinfo.value.reason == "auth"
    deadline = time.monotonic() + 30
    with pytest.raises(TransportError):  # the open connection was closed and cannot come back
        while time.monotonic() < deadline:
            live.publish(topology.updates_exchange, topology.shard_key(0), b"after revocation")
            live.flush(timeout=5)
            time.sleep(0.2)
    live.close()


def test_add_client_command_prints_a_working_url(
    amqp_url: str, capsys: pytest.CaptureFixture[str], topology: Names
) -> None:
    user = f"{topology.namespace}-carol"
    assert (
        cli.main(["broker", "add-client", user, "--amqp-url", amqp_url, "--namespace", topology.namespace])
        == 0
    )
    url = capsys.readouterr().out.strip()
    with connect(url) as client:
        client.publish(topology.updates_exchange, topology.shard_key(0), b"from carol")
        client.flush()

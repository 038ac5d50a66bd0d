"""TLS (issue 7, "Security"): a transfer over ``amqps://`` with certificates verified both ways, and refusals.

A throwaway CA, server certificate (127.0.0.1 / localhost) and client certificate are generated with openssl;
a throwaway RabbitMQ node (``tests/brokers.py``, never the main broker) listens with TLS only (no plain AMQP
port) as configured by ``broker_config/tls.conf`` (``verify_peer`` + ``fail_if_no_peer_cert``). A client
certificate from another CA, a client without a certificate, and a client that does not trust the server's CA
are each refused.
"""

from __future__ import annotations

import json
import ssl
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pika
import pytest

from tests import brokers

pytestmark = [pytest.mark.broker, pytest.mark.slow]


TLS_CONF = Path(__file__).resolve().parent.parent / "broker_config" / "tls.conf"


def tls_conf(port: int, certs: dict[str, Path]) -> str:
    """broker_config/tls.conf (what operators append to rabbitmq.conf), pointed at the throwaway certificates
    and a free loopback port; its management-over-HTTPS lines are left out (the node runs no management
    plugin)."""
    cert_dir = certs["ca"].parent
    assert certs["server_cert"] == cert_dir / "server.pem" and certs["server_key"] == cert_dir / "server.key"
    lines = []
    for line in TLS_CONF.read_text().splitlines():
        key = line.split("=", 1)[0].strip()
        if key.startswith("management."):
            continue
        if key == "listeners.ssl.default":
            line = f"listeners.ssl.default = 127.0.0.1:{port}"
        lines.append(line.replace("/etc/rabbitmq/tls", str(cert_dir)))
    conf = "\n".join(lines) + "\n"
    for required in ("verify_peer", "fail_if_no_peer_cert = true", str(certs["ca"])):
        assert required in conf, f"{TLS_CONF} lacks {required!r}"
    return conf


class TlsBroker:
    def __init__(self, node: brokers.Node, port: int, certs: dict[str, Path]) -> None:
        self.node = node
        self.port = port
        self.certs = certs

    def url(self, *, ca: str = "ca", cert: str | None = "client_cert", key: str | None = "client_key") -> str:
        """An amqps:// URL for fedq's transport: CA, client certificate and key as query parameters (the
        transport always verifies the server's certificate and host name)."""
        query = [f"cafile={quote(str(self.certs[ca]))}"]
        if cert and key:
            query += [f"certfile={quote(str(self.certs[cert]))}", f"keyfile={quote(str(self.certs[key]))}"]
        return f"amqps://guest:guest@127.0.0.1:{self.port}/%2F?" + "&".join(query)


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    reason = brokers.available()
    if reason:
        pytest.skip(f"cannot start a throwaway RabbitMQ node: {reason}")
    if not TLS_CONF.exists():
        pytest.skip(f"{TLS_CONF} missing")
    base = tmp_path_factory.mktemp("tls")
    certs = brokers.make_certs(base / "certs")
    port = brokers.free_port()
    with brokers.single_node("tls", extra_conf=tls_conf(port, certs), tcp=False, ready_port=port) as node:
        yield TlsBroker(node, port, certs)


def _pika_tls(
    b: TlsBroker, *, ca: str = "ca", cert: str | None = "client_cert", key: str | None = "client_key"
):
    ctx = ssl.create_default_context(cafile=str(b.certs[ca]))
    if cert and key:
        ctx.load_cert_chain(str(b.certs[cert]), str(b.certs[key]))
    params = pika.ConnectionParameters(
        host="127.0.0.1",
        port=b.port,
        credentials=pika.PlainCredentials("guest", "guest"),
        ssl_options=pika.SSLOptions(ctx, server_hostname="localhost"),
        connection_attempts=1,
        socket_timeout=10,
        blocked_connection_timeout=10,
    )
    return pika.BlockingConnection(params)


def test_pika_baseline_mutual_tls(tls_broker: TlsBroker) -> None:
    """The listener and certificates themselves work (independent of fedq's transport)."""
    conn = _pika_tls(tls_broker)
    try:
        assert conn.is_open
    finally:
        conn.close()


def test_transfer_over_amqps_with_verification(tls_broker: TlsBroker) -> None:
    """A transfer through fedq's transport (connect(amqps URL)): declare, publish with confirms, consume,
    ack."""
    from fedq.topology import Names
    from fedq.transport import connect

    names = Names(f"tls{uuid.uuid4().hex[:8]}")
    t = connect(tls_broker.url())
    try:
        t.declare(names, 1)
        bodies = [bytes([i]) * (100_000 + i) for i in range(8)]
        for i, body in enumerate(bodies):
            t.publish(names.updates_exchange, names.shard_key(0), body, headers={"i": i})
        t.flush(timeout=30)
        t.consume(names.updates_queue(0), prefetch=4)
        got = {}
        for _ in range(len(bodies)):
            d = t.get(timeout=30)
            assert d is not None, "delivery over TLS timed out"
            got[d.headers["i"]] = d.body
            t.ack(d)
        assert [got[i] for i in range(len(bodies))] == bodies
        # the broker's view: the connection is TLS and authenticated the client certificate
        rows = json.loads(
            tls_broker.node.ctl("list_connections", "ssl", "peer_cert_subject", "--formatter", "json")
        )
        assert rows, "no connection listed"
        assert all(r["ssl"] is True and "fedq-client" in str(r["peer_cert_subject"]) for r in rows), rows
    finally:
        t.close()


@pytest.mark.parametrize(
    ("ca", "cert", "key", "why"),
    [
        ("ca", "rogue_cert", "rogue_key", "client certificate from an untrusted CA"),
        ("ca", None, None, "no client certificate"),
        (
            "rogue_ca",
            "client_cert",
            "client_key",
            "server certificate not signed by the CA the client trusts",
        ),
    ],
)
def test_refused(tls_broker: TlsBroker, ca: str, cert: str | None, key: str | None, why: str) -> None:
    """Refusals, first through pika directly, then through fedq's transport."""
    with pytest.raises((pika.exceptions.AMQPError, ssl.SSLError, OSError)):
        conn = _pika_tls(tls_broker, ca=ca, cert=cert, key=key)
        # TLS 1.3: a refused client certificate may surface only at the first read after the handshake
        conn.channel()
        conn.close()

    from fedq.errors import FedqError
    from fedq.topology import Names
    from fedq.transport import connect

    # the transport retries a failed first connection like a lost one (for reconnect_timeout): keep that short
    t0 = time.monotonic()
    with pytest.raises((FedqError, ssl.SSLError, OSError)) as refused:
        t = connect(tls_broker.url(ca=ca, cert=cert, key=key), reconnect_timeout=2.0)
        try:
            t.declare(Names(f"tls{uuid.uuid4().hex[:8]}"), 1)
        finally:
            t.close()
    print(f"fedq transport refused ({why}) after {time.monotonic() - t0:.1f}s: {refused.value!r}"[:300])

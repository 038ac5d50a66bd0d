"""Operations on a running broker through its management HTTP API: apply the topology, enrol and revoke
clients.

AMQP cannot create users or set permissions, and applying definitions over HTTP lets an operator set a broker
up without running a worker; the standard library's urllib is enough, so no dependency is added.
"""

from __future__ import annotations

import json
import re
import socket
import urllib.error
import urllib.request
from base64 import b64encode
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from fedq.errors import TransportError

MANAGEMENT_PORT = 15672
_VHOST_OBJECTS = ("exchanges", "queues", "bindings")


def management_url_for(amqp_url: str) -> str:
    """The management API of the broker an AMQP URL points at: same host and credentials, port 15672."""
    parts = urlsplit(amqp_url)
    scheme = "https" if parts.scheme == "amqps" else "http"
    user = parts.username or "guest"
    password = parts.password or "guest"
    host = parts.hostname or "127.0.0.1"
    return f"{scheme}://{quote(user, safe='')}:{quote(password, safe='')}@{host}:{MANAGEMENT_PORT}"


def vhost_of(amqp_url: str) -> str:
    """The vhost of an AMQP URL (its path, percent-decoded; empty means "/")."""
    path = urlsplit(amqp_url).path.lstrip("/")
    return unquote(path) or "/"


class Management:
    """A small client of the RabbitMQ management API; errors are ``TransportError`` with the HTTP status."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        parts = urlsplit(url)
        self.base = f"{parts.scheme}://{parts.hostname}:{parts.port or MANAGEMENT_PORT}/api"
        self.user = unquote(parts.username or "guest")
        credentials = f"{self.user}:{unquote(parts.password or 'guest')}"
        self._auth = "Basic " + b64encode(credentials.encode()).decode()
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Authorization", self._auth)
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            if exc.code == 401:
                raise TransportError(
                    f"the management API at {self.base} refused the login of user {self.user!r} (HTTP 401): "
                    "broker commands need a user tagged administrator "
                    f"(`rabbitmqctl set_user_tags {self.user} administrator`)",
                    reason="http_401",
                ) from exc
            raise TransportError(
                f"{method} {path}: HTTP {exc.code} {detail}", reason=f"http_{exc.code}"
            ) from exc
        except OSError as exc:
            raise TransportError(self._unreachable(exc), reason="management_unreachable") from exc
        return json.loads(payload) if payload else None

    def _unreachable(self, exc: OSError) -> str:
        """Why the management API did not answer, with the fix."""
        reason = getattr(exc, "reason", exc)  # urllib wraps socket errors in URLError.reason
        if isinstance(reason, socket.gaierror):
            return f"cannot resolve the management API's host in {self.base} ({reason.strerror})"
        if isinstance(reason, ConnectionRefusedError):
            return (
                f"no management API answers at {self.base} (connection refused): enable the plugin with "
                "`rabbitmq-plugins enable rabbitmq_management`, or give --management-url"
            )
        return f"the management API at {self.base} did not answer: {reason}"

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def put(self, path: str, body: Any) -> Any:
        return self.request("PUT", path, body)

    def post(self, path: str, body: Any) -> Any:
        return self.request("POST", path, body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)


def q(name: str) -> str:
    """A name as one path segment of the management API (vhost "/" is "%2F")."""
    return quote(name, safe="")


def apply(management: Management, spec: dict[str, Any]) -> None:
    """Import definitions (``topology.definitions``); existing objects with the same arguments are kept.

    The import is scoped to the vhost, which is created only when missing: importing an existing vhost would
    reset its description and tags, and the vhost may be shared.
    """
    for vhost in spec["vhosts"]:
        try:
            management.get(f"/vhosts/{q(vhost['name'])}")
        except TransportError as exc:
            if exc.reason != "http_404":
                raise
            management.put(f"/vhosts/{q(vhost['name'])}", {})
        objects = {kind: [o for o in spec[kind] if o["vhost"] == vhost["name"]] for kind in _VHOST_OBJECTS}
        management.post(f"/definitions/{q(vhost['name'])}", objects)


def client_permissions(namespace: str) -> dict[str, str]:
    """Least privilege for a client: publish updates, read the model streams, declare or delete nothing."""
    ns = re.escape(namespace)
    return {"configure": "^$", "write": f"^{ns}\\.updates$", "read": f"^{ns}\\.(models|versions)$"}


def add_client(management: Management, name: str, password: str, *, namespace: str, vhost: str = "/") -> None:
    """Create (or reset) a client's broker user with ``client_permissions`` on ``vhost``."""
    management.put(f"/users/{q(name)}", {"password": password, "tags": ""})
    management.put(f"/permissions/{q(vhost)}/{q(name)}", client_permissions(namespace))


def remove_client(management: Management, name: str) -> int:
    """Delete a client's user and close its open connections (a deleted user's live connection would stay up).

    Returns how many connections were closed.
    """
    management.delete(f"/users/{q(name)}")
    closed = 0
    for connection in management.get("/connections?columns=name,user"):
        if connection.get("user") == name:
            try:
                management.delete(f"/connections/{q(connection['name'])}")
                closed += 1
            except TransportError as exc:
                if exc.reason != "http_404":
                    raise
    return closed

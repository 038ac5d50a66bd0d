"""Operations on a running broker through its management HTTP API: apply the topology, enrol and revoke
clients.

AMQP cannot create users or set permissions, and applying definitions over HTTP lets an operator set a broker
up without running a worker; the standard library's urllib is enough, so no dependency is added.
"""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.error
import urllib.request
from base64 import b64encode
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from fedq.errors import ConfigError, TransportError

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


IDEMPOTENT = frozenset({"GET", "PUT"})
SERVER_ERRORS = frozenset({"http_500", "http_502", "http_503"})
RETRY_DELAYS = (0.5, 2.0)


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
        """One call; a GET or PUT is tried again after a server error, which a loaded management plugin
        answers now and then (HTTP 500, seen twice in one afternoon's test runs). A DELETE is not: a retry
        of one that took effect would report the thing missing."""
        for delay in RETRY_DELAYS if method in IDEMPOTENT else ():
            try:
                return self._request_once(method, path, body)
            except TransportError as exc:
                if exc.reason not in SERVER_ERRORS:
                    raise
                time.sleep(delay)
        return self._request_once(method, path, body)

    def _request_once(self, method: str, path: str, body: Any) -> Any:
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
                    "a wrong user or password, or a user not tagged administrator (broker commands need it: "
                    f"`rabbitmqctl set_user_tags {self.user} administrator`)",
                    reason="http_401",
                ) from exc
            # named with the API's address: a proxy or another web server on that port answers too
            raise TransportError(
                f"the management API at {self.base} answered {method} {path} with HTTP {exc.code} {detail}",
                reason=f"http_{exc.code}",
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


# Users fedq creates carry a tag naming their role and namespace: fedq only ever changes or deletes those.
CLIENT_ROLE = "client"
AGGREGATOR_ROLE = "aggregator"
DEFAULT_CLIENT_LIMITS = {"max-connections": 4, "max-channels": 32}


def fedq_tag(role: str, namespace: str) -> str:
    return f"fedq-{role}:{namespace}"


def tags_of(user: dict[str, Any]) -> list[str]:
    """A user's tags: a list in RabbitMQ 3.9+, a comma-separated string before."""
    tags = user.get("tags") or []
    return [t for t in tags.split(",") if t] if isinstance(tags, str) else list(tags)


def fedq_role(user: dict[str, Any]) -> tuple[str, str] | None:
    """(role, namespace) of a user fedq created, None for any other user."""
    for tag in tags_of(user):
        if tag.startswith("fedq-") and ":" in tag:
            role, namespace = tag[len("fedq-") :].split(":", 1)
            return role, namespace
    return None


def find_user(management: Management, name: str) -> dict[str, Any] | None:
    try:
        user: dict[str, Any] = management.get(f"/users/{q(name)}")
    except TransportError as exc:
        if exc.reason == "http_404":
            return None
        raise
    return user


def add_client(
    management: Management,
    name: str,
    password: str,
    *,
    namespace: str,
    vhost: str = "/",
    rotate: bool = False,
    limits: dict[str, int] | None = None,
) -> None:
    """Create a client's broker user with ``client_permissions`` on ``vhost`` and per-user ``limits``
    (default ``DEFAULT_CLIENT_LIMITS``; a value of 0 leaves that limit off); with ``rotate``, set a new
    password on a client user fedq created before."""
    _put_user(management, name, password, CLIENT_ROLE, namespace, rotate)
    management.put(f"/permissions/{q(vhost)}/{q(name)}", client_permissions(namespace))
    for limit, value in (DEFAULT_CLIENT_LIMITS if limits is None else limits).items():
        if value > 0:
            management.put(f"/user-limits/{q(name)}/{limit}", {"value": value})


def aggregator_permissions(namespace: str, shard: int | None) -> dict[str, str]:
    """Least privilege for an aggregator shard (``shard`` None: any shard).

    It declares the whole topology at start-up (idempotent), so it may configure the namespace's objects
    and bind its queues; it publishes to the control, models, versions and dead-letter exchanges; it reads
    only its own update and control queues (and the exchanges it binds from). It cannot publish updates.
    """
    ns = re.escape(namespace)
    queues = r"\d+" if shard is None else str(shard)
    streams = r"models(\.in)?|versions(\.in)?"
    return {
        # the models and versions exchanges are "{ns}.models.in" and "{ns}.versions.in" (topology.Names)
        "configure": f"^{ns}\\.(updates|control|{streams}|dlx|dead-letter)(\\.shard\\.\\d+)?$",
        "write": f"^{ns}\\.(control|{streams}|dlx|dead-letter|(updates|control)\\.shard\\.\\d+)$",
        "read": f"^{ns}\\.(updates|control|{streams}|dlx|(updates|control)\\.shard\\.{queues})$",
    }


def add_aggregator(
    management: Management,
    name: str,
    password: str,
    *,
    namespace: str,
    shard: int | None,
    vhost: str = "/",
    rotate: bool = False,
) -> None:
    """Create an aggregator's broker user with ``aggregator_permissions`` (or rotate its password)."""
    _put_user(management, name, password, AGGREGATOR_ROLE, namespace, rotate)
    management.put(f"/permissions/{q(vhost)}/{q(name)}", aggregator_permissions(namespace, shard))


def _put_user(
    management: Management, name: str, password: str, role: str, namespace: str, rotate: bool
) -> None:
    """Create a user tagged as fedq's, or with ``rotate`` change the password of one fedq created; refuse to
    touch anyone else (an administrator, another team's user, ``guest``)."""
    existing = find_user(management, name)
    tag = fedq_tag(role, namespace)
    if existing is not None:
        owner = fedq_role(existing)
        if owner != (role, namespace):
            what = f"a fedq {owner[0]} of namespace {owner[1]}" if owner else "not created by fedq"
            raise ConfigError(f"user {name!r} exists ({what}): fedq leaves it alone; choose another name")
        if not rotate:
            raise ConfigError(
                f"user {name!r} exists (a fedq {role} of {namespace}); its password is unchanged: give "
                "--rotate to set a new one (its connections then need the new URL at their next reconnect)"
            )
    management.put(f"/users/{q(name)}", {"password": password, "tags": tag})


def remove_user(management: Management, name: str, role: str | None = None) -> int:
    """Delete a user fedq created (of ``role``, if given) and close its open connections (a deleted user's
    live connection would stay up). Refuses users fedq did not create. Returns how many connections closed."""
    existing = find_user(management, name)
    if existing is None:
        raise ConfigError(f"no broker user {name!r}")
    owner = fedq_role(existing)
    if owner is None or (role is not None and owner[0] != role):
        what = f"a fedq {owner[0]}" if owner else "not created by fedq"
        raise ConfigError(f"user {name!r} is {what}: fedq removes only the {role or 'fedq'} users it created")
    before = _connections_of(management, name)
    management.delete(f"/users/{q(name)}")
    # RabbitMQ closes a deleted user's connections itself (3.10 does): those listed before count as closed,
    # else the command reported "0 open connections closed" for a client it had just cut off (walk 2026-11-29)
    after = _connections_of(management, name)
    for connection in after:
        _close_connection(management, connection)
    return len(before | after)


def _connections_of(management: Management, user: str) -> set[str]:
    rows = management.get("/connections?columns=name,user")
    return {row["name"] for row in rows if row.get("user") == user}


def _close_connection(management: Management, name: str) -> None:
    """Close one connection; one that closed meanwhile (404) is what was wanted."""
    try:
        management.delete(f"/connections/{q(name)}")
    except TransportError as exc:
        if exc.reason != "http_404":
            raise


def remove_client(management: Management, name: str) -> int:
    """``remove_user`` for a client user."""
    return remove_user(management, name, CLIENT_ROLE)


@dataclass
class Teardown:
    queues: list[str]
    exchanges: list[str]
    users: list[str]


def teardown(management: Management, namespace: str, vhost: str, *, force: bool = False) -> Teardown:
    """Delete a namespace: its queues (with their messages), exchanges, and the users fedq created for it.

    Refuses while a queue has consumers (workers still running) unless ``force``: deleting their queues would
    cancel them mid-work.
    """
    prefix = namespace + "."
    rows = management.get(f"/queues/{q(vhost)}?columns=name,type")
    queues = [r for r in rows if r["name"].startswith(prefix)]
    streams = {r["name"] for r in queues if r.get("type") == "stream"}
    # Live consumers, not the queues' statistics (those lag by seconds). A stream consumer whose connection
    # died stays listed without a channel (RabbitMQ 3.10: every killed client left one on {ns}.versions)
    # and would block the teardown for ever, so a stream's consumer counts only on a channel; any other
    # queue's counts as soon as it is listed (a new consumer's channel details come seconds later).
    consumed = {
        name
        for c in management.get(f"/consumers/{q(vhost)}")
        if (name := c.get("queue", {}).get("name", "")) not in streams or c.get("channel_details")
    }
    busy = [r["name"] for r in queues if r["name"] in consumed]
    if busy and not force:
        raise ConfigError(
            f"{len(busy)} queue(s) of {namespace} have consumers ({', '.join(sorted(busy))}): stop the "
            "workers first, or give --force"
        )
    done = Teardown([], [], [])
    for row in queues:
        _delete(management, f"/queues/{q(vhost)}/{q(row['name'])}", done.queues, row["name"])
    for row in management.get(f"/exchanges/{q(vhost)}?columns=name"):
        if row["name"].startswith(prefix):
            _delete(management, f"/exchanges/{q(vhost)}/{q(row['name'])}", done.exchanges, row["name"])
    for user in management.get("/users"):
        owner = fedq_role(user)
        if owner is not None and owner[1] == namespace:
            remove_user(management, user["name"])
            done.users.append(user["name"])
    return done


def _delete(management: Management, path: str, done: list[str], name: str) -> None:
    """Delete what may already be gone (auto-deleted, or removed by someone else meanwhile)."""
    try:
        management.delete(path)
        done.append(name)
    except TransportError as exc:
        if exc.reason != "http_404":
            raise

"""Shared fixtures for tests that use the real broker.

``amqp_url`` skips the test when no broker answers. ``namespace`` gives a unique namespace and afterwards
deletes every queue and exchange named ``{namespace}.*`` and every user named ``{namespace}-*`` (nothing else:
other engineers share the broker). ``management`` is a ``fedq.broker.Management`` client for the same broker.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
import torch

from fedq.broker import Management, management_url_for, q, vhost_of
from fedq.errors import TransportError
from fedq.topology import Names
from fedq.transport import default_url


@pytest.fixture(autouse=True)
def _torch_threads() -> Iterator[None]:
    """Each test gets torch's thread count as the test before found it. A command run in-process sets it, as
    its own process would (``fedq bench quality`` did before refusing a value), and a later test then ran
    its federation with two encoders one run in a few: results must not depend on the order tests run in
    (code that needs several threads sets them in its test)."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def amqp_url() -> str:
    url = default_url()
    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5672), timeout=2).close()
    except OSError:
        pytest.skip(f"no broker at {parts.hostname}:{parts.port or 5672}")
    return url


@pytest.fixture(scope="session")
def management(amqp_url: str) -> Management:
    return Management(os.environ.get("FEDQ_MANAGEMENT_URL") or management_url_for(amqp_url))


@pytest.fixture(scope="session")
def vhost(amqp_url: str) -> str:
    return vhost_of(amqp_url)


@pytest.fixture
def namespace(management: Management, vhost: str) -> Iterator[str]:
    ns = f"t{uuid.uuid4().hex[:12]}"
    yield ns
    cleanup_namespace(management, vhost, ns)


@pytest.fixture
def names(namespace: str) -> Names:
    return Names(namespace)


def cleanup_namespace(management: Management, vhost: str, ns: str) -> None:
    """Delete what a test declared or created under ``ns``; tolerate what is already gone."""
    for kind in ("queues", "exchanges"):
        for item in management.get(f"/{kind}/{q(vhost)}?columns=name"):
            if item["name"].startswith((ns + ".", ns + "-")):  # a test may derive namespaces: f"{ns}-2"
                _delete_quietly(management, f"/{kind}/{q(vhost)}/{q(item['name'])}")
    for user in management.get("/users"):
        if user["name"].startswith(ns + "-"):
            _delete_quietly(management, f"/users/{q(user['name'])}")


def _delete_quietly(management: Management, path: str) -> None:
    try:
        management.delete(path)
    except TransportError as exc:
        if exc.reason != "http_404":
            raise


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Under FEDQ_NO_SKIP (set by .ci/run) a skip fails: in CI it can only mean missing infrastructure."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if os.environ.get("FEDQ_NO_SKIP") and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped, and FEDQ_NO_SKIP forbids skips: {report.longrepr}"

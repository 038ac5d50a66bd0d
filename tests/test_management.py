"""The management client against a local HTTP server that fails as a loaded management plugin does."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from fedq import broker
from fedq.broker import Management
from fedq.errors import TransportError


@dataclass
class Flaky:
    """Answers 500 to the first ``failures`` requests, then 200 with the request's method."""

    url: str = ""
    failures: int = 0
    seen: list[str] = field(default_factory=list)

    def reset(self, failures: int) -> None:
        self.failures, self.seen = failures, []


@pytest.fixture
def flaky(monkeypatch: pytest.MonkeyPatch) -> Iterator[Flaky]:
    monkeypatch.setattr(broker, "RETRY_DELAYS", (0.01, 0.01))
    state = Flaky()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            state.seen.append(self.command)
            failing = len(state.seen) <= state.failures
            body = json.dumps({"error": "Internal Server Error"} if failing else {"m": self.command}).encode()
            self.send_response(500 if failing else 200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_PUT = do_DELETE = _answer

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state.url = f"http://guest:guest@127.0.0.1:{server.server_port}/"
    yield state
    server.shutdown()


def test_a_get_or_put_outlives_two_server_errors(flaky: Flaky) -> None:
    flaky.reset(failures=2)
    assert Management(flaky.url).get("/users") == {"m": "GET"}
    flaky.reset(failures=2)
    assert Management(flaky.url).put("/users/a", {}) == {"m": "PUT"}
    assert flaky.seen == ["PUT"] * 3


def test_a_third_server_error_and_any_delete_error_reach_the_caller(flaky: Flaky) -> None:
    flaky.reset(failures=3)
    with pytest.raises(TransportError) as err:
        Management(flaky.url).get("/users")
    assert err.value.reason == "http_500" and len(flaky.seen) == 3
    base = flaky.url.replace("guest:guest@", "").rstrip("/")
    assert str(err.value).startswith(f"the management API at {base}/api answered GET /users with HTTP 500")
    flaky.reset(failures=1)
    with pytest.raises(TransportError):
        Management(flaky.url).delete("/users/a")
    assert flaky.seen == ["DELETE"]  # not repeated: a DELETE that took effect would then say "not found"

"""What every hostile walk shares: a namespace of its own on the local broker, one least-privilege broker user
per client, a real aggregator process (``workers.aggregator``, started from the repository root) and the clean-up
of all of it, whatever happens in between."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from fedq.broker import Management, add_client, management_url_for
from fedq.topology import Names
from fedq.transport import connect
from tests.conftest import cleanup_namespace
from tests.test_broker_security import client_url

URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
ROOT = Path(__file__).resolve().parents[3]


class Walk:
    """One walk's federation: ``urls[who]`` is each client's AMQP URL (its own broker user)."""

    def __init__(self, prefix: str, clients: tuple[str, ...]) -> None:
        self.names = Names(f"{prefix}{uuid.uuid4().hex[:8]}")
        self.ns = self.names.namespace
        self.mgmt = Management(management_url_for(URL))
        self.tmp = Path(f"/tmp/fedq-hostile-walk/{self.ns}")
        self.tmp.mkdir(parents=True)
        self.log = self.tmp / "agg.log"
        self.shard_dir = self.tmp / "state" / "shard-0"
        self.worker: subprocess.Popen[bytes] | None = None
        with connect(URL) as operator:
            operator.declare(self.names, 1)
        self.urls = {}
        for who in clients:
            add_client(self.mgmt, f"{self.ns}-{who}", "pw", namespace=self.ns, vhost="/")
            self.urls[who] = client_url(URL, f"{self.ns}-{who}", "pw")

    def start_aggregator(self, init: Path, *options: str, state: Path | None = None) -> None:
        """One shard over the namespace, its log in ``log``; returns once it has written version 0."""
        state = state or self.tmp / "state"
        self.shard_dir = state / "shard-0"
        cmd = [sys.executable, "-m", "workers.aggregator", "--amqp-url", URL, "--namespace", self.ns,
               "--init", str(init), "--state-dir", str(state), "--device", "cpu", *options]
        with open(self.log, "wb") as out:
            self.worker = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        while "version 0 from" not in self.log.read_text():
            assert self.alive(), self.log.read_text()
            time.sleep(0.2)

    def alive(self) -> bool:
        return self.worker is not None and self.worker.poll() is None

    def version(self) -> int:
        """The shard's version as its state.json says (0 before the first one is written)."""
        try:
            return int(json.loads((self.shard_dir / "state.json").read_text())["version"])
        except (OSError, ValueError, KeyError):
            return 0

    def refused(self) -> int:
        return self.log.read_text().count("refused a message")

    def close(self) -> None:
        if self.alive():
            assert self.worker is not None
            self.worker.terminate()
            self.worker.wait(30)
        cleanup_namespace(self.mgmt, "/", self.ns)


@contextlib.contextmanager
def walk(prefix: str, clients: tuple[str, ...] = ("alice", "mallory")) -> Iterator[Walk]:
    federation = Walk(prefix, clients)
    try:
        yield federation
    finally:
        federation.close()

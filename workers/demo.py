"""``make demo`` / ``fedq demo``: one aggregator and four clients learn Shakespeare over the local broker.

The launcher makes sure a broker answers (starting an installed but stopped RabbitMQ), declares a fresh
namespace, writes the initial model, starts the aggregator (FedBuff) and the client processes (nf4 updates
with error feedback, non-IID shards), and prints one line per model version until the target version. It
deletes the namespace and its temporary files at the end, and Ctrl-C stops every process it started.

Validation loss is measured here: the launcher is itself a reader of the models stream (a
``fedq.client.Client`` that only receives), so it scores each version it receives on the held-out text without
slowing the aggregator. Wire bytes, their fp32 equivalent and peak RSS come from the processes' Prometheus
endpoints (the counters ``send_container`` keeps: chunk message bytes; manifests and commits add a few KB per
update). The clients end as soon as they receive the last version, before the launcher has scored it: for
that line the launcher waits for them to exit and reads the final metrics page each wrote
(``--metrics-file``), so the last line counts the updates that made the last version."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import types
import urllib.request
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

from fedq.broker import Management, management_url_for, q, vhost_of
from fedq.cli import main as fedq_main
from fedq.client import Client
from fedq.errors import FedqError, StreamError, TransportError
from fedq.safetensors import save_file
from fedq.topology import Names
from fedq.transport import connect, default_url
from workers import gpt, shakespeare
from workers.demo_client import initial_model, model_config

NO_BROKER = (
    "No RabbitMQ broker answers at {where}. Get one with either\n"
    "  sudo apt-get install rabbitmq-server          (Debian/Ubuntu; it starts on install)\n"
    "  docker compose -f monitoring/docker-compose.yml up -d rabbitmq\n"
    "or point FEDQ_AMQP_URL at a running broker."
)
QUICK = {
    "versions": 3,
    "clients": 2,
    "buffer_size": 2,
    "local_steps": 2,
    "n_embd": 32,
    "n_layer": 1,
    "n_head": 2,
    "block_size": 32,
    "batch_size": 8,
    "eval_batches": 2,
}


@dataclass
class Row:
    """One model version as the launcher saw it."""

    version: int
    seconds: float
    val_loss: float
    wire_bytes: float
    fp32_bytes: float
    aggregator_peak_rss: float
    client_peak_rss: float


def run(args: argparse.Namespace) -> int:
    # Ctrl-C, and a SIGTERM from a supervisor, take the same way out: stop the children, delete the namespace.
    # SIGINT is set explicitly because a shell starting us in the background would have it ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    try:
        url = ensure_broker()
    except TransportError as exc:
        print(exc, file=sys.stderr)
        return 2
    namespace = f"demo-{uuid.uuid4().hex[:8]}"
    workdir = Path(tempfile.mkdtemp(prefix="fedq-demo-"))
    procs: list[subprocess.Popen[bytes]] = []
    status, keep_logs = 1, False
    try:
        with connect(url) as transport:
            transport.declare(Names(namespace), 1)
        corpus = shakespeare.build_corpus(args.clients, args.split, args.seed)
        init = _write_initial_model(args, corpus.vocab.size, workdir)
        ports = [_free_port() for _ in range(args.clients + 1)]
        procs = _start(args, url, namespace, init, workdir, ports)
        print(
            f"namespace {namespace}: aggregator (fedbuff K={args.buffer_size}) + {args.clients} clients "
            f"({args.codec}, {args.split} split), model {_param_count(args, corpus.vocab.size) / 1e6:.2f} M "
            f"parameters, until version {args.versions}; logs in {workdir}",
            flush=True,
        )
        _client_log_to(workdir / "monitor.log")
        rows = _monitor(args, url, namespace, corpus, ports, procs, workdir)
        paths = _write_results(args, namespace, rows)
        print("results: " + "  ".join(str(p) for p in paths))
        status = 0
    except KeyboardInterrupt:
        print("\ninterrupted: stopping every process this demo started", file=sys.stderr)
        status = 130
    except FedqError as exc:
        print(f"demo failed: {exc} (logs kept in {workdir})", file=sys.stderr)
        keep_logs = True
    finally:
        _stop(procs)
        _delete_namespace(url, namespace)
        if not keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)
    return status


def _interrupt(signum: int, frame: types.FrameType | None) -> None:
    raise KeyboardInterrupt


# broker -----------------------------------------------------------------------------------------------------
def ensure_broker(wait: float = 60.0) -> str:
    """The broker URL to use; starts a local RabbitMQ that is installed but not running.

    With FEDQ_AMQP_URL set, that broker must answer: starting another one would not help.
    """
    url = default_url()
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 5672
    if _answers(host, port):
        return url
    where = f"{host}:{port}"
    if os.environ.get("FEDQ_AMQP_URL") or host not in ("127.0.0.1", "localhost"):
        raise TransportError(NO_BROKER.format(where=where), reason="no_broker")
    server = shutil.which("rabbitmq-server")
    if server is None:
        raise TransportError(NO_BROKER.format(where=where), reason="no_broker")
    print(f"starting the local RabbitMQ ({server} -detached) ...", flush=True)
    subprocess.run([server, "-detached"], check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if _answers(host, port):
            return url
        time.sleep(1.0)
    raise TransportError(
        f"started {server} -detached, but nothing answers at {where} after {wait:.0f} s; "
        "see `rabbitmq-diagnostics status`",
        reason="no_broker",
    )


def _answers(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        return False
    return True


def _delete_namespace(url: str, namespace: str) -> None:
    """Delete the run's queues and exchanges (through the management API: AMQP cannot list them)."""
    management = Management(management_url_for(url))
    vhost = vhost_of(url)
    try:
        for kind in ("queues", "exchanges"):
            for item in management.get(f"/{kind}/{q(vhost)}?columns=name"):
                if item["name"].startswith(namespace + "."):
                    management.delete(f"/{kind}/{q(vhost)}/{q(item['name'])}")
    except TransportError as exc:
        print(f"could not delete namespace {namespace} ({exc.reason}); its queues remain", file=sys.stderr)


# processes --------------------------------------------------------------------------------------------------
def _client_log_to(path: Path) -> None:
    """The launcher's own client (it scores each version) logs into the logs directory like every other
    process: its INFO lines (how each version was read) would break the table on the terminal."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    client_log = logging.getLogger("fedq.client")
    client_log.addHandler(handler)
    client_log.propagate = False


def _write_initial_model(args: argparse.Namespace, vocab_size: int, workdir: Path) -> Path:
    return save_file(initial_model(args, vocab_size).state_dict(), workdir / "init.safetensors")


def _param_count(args: argparse.Namespace, vocab_size: int) -> int:
    return gpt.num_parameters(gpt.GPT(model_config(args, vocab_size)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _model_flags(args: argparse.Namespace) -> list[str]:
    flags = {
        "--clients": args.clients,
        "--split": args.split,
        "--seed": args.seed,
        "--n-embd": args.n_embd,
        "--n-layer": args.n_layer,
        "--n-head": args.n_head,
        "--block-size": args.block_size,
    }
    return [str(x) for pair in flags.items() for x in pair]


def _start(
    args: argparse.Namespace, url: str, namespace: str, init: Path, workdir: Path, ports: list[int]
) -> list[subprocess.Popen[bytes]]:
    """The aggregator, then the clients; each in its own session, so Ctrl-C reaches only the launcher.

    The aggregator stops by itself after the last version, and so do the clients once they have received it,
    each writing its final metrics page into the work directory (``metrics_file``) for the last line.
    """
    common = ["--amqp-url", url, "--namespace", namespace]
    aggregator = [
        *("-m", "workers.aggregator", *common, "--strategy", "fedbuff"),
        *("--buffer-size", str(args.buffer_size), "--max-versions", str(args.versions)),
        *("--init", str(init), "--state-dir", str(workdir / "state"), "--metrics-port", str(ports[0])),
        *("--config", f"local_steps={args.local_steps}"),
    ]
    commands = [("aggregator", aggregator)]
    for k in range(args.clients):
        client = [
            *("-m", "workers.demo_client", *common, "--name", f"client{k}", "--index", str(k)),
            *("--codec", args.codec, "--batch-size", str(args.batch_size)),
            *("--metrics-port", str(ports[k + 1]), "--metrics-file", str(metrics_file(workdir, k))),
            *_model_flags(args),
        ]
        commands.append((f"client{k}", client))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = []
    for name, command in commands:
        log = open(workdir / f"{name}.log", "wb")  # noqa: SIM115 - the child owns it; closed when we exit
        procs.append(
            subprocess.Popen(
                [sys.executable, *command],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        )
    return procs


def metrics_file(workdir: Path, k: int) -> Path:
    """Where client ``k`` writes its final metrics page."""
    return workdir / f"client{k}.metrics"


def _stop(procs: list[subprocess.Popen[bytes]], grace: float = 10.0) -> None:
    """SIGTERM every child still running, then SIGKILL whatever has not exited after ``grace`` seconds."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


# monitoring -------------------------------------------------------------------------------------------------
def _monitor(
    args: argparse.Namespace,
    url: str,
    namespace: str,
    corpus: shakespeare.Corpus,
    ports: list[int],
    procs: list[subprocess.Popen[bytes]],
    workdir: Path,
) -> list[Row]:
    """Receive each version as it is announced, score it, print its line; until the target version."""
    val = shakespeare.validation_batches(corpus, args.eval_batches, 64, args.block_size, args.seed)
    model = gpt.GPT(model_config(args, corpus.vocab.size))
    scraper = _Scraper(ports, {port: metrics_file(workdir, k) for k, port in enumerate(ports[1:])})
    start = time.monotonic()
    rows: list[Row] = []
    print(
        f"{'version':>7} {'time':>6} {'val loss':>8} {'wire MB':>8} {'fp32 MB':>8} {'ratio':>6} "
        f"{'agg RSS':>8} {'client RSS':>10}"
    )
    with Client("demo-monitor", amqp_url=url, namespace=namespace, codec="fp32") as monitor:
        version = -1
        while version < args.versions:
            last = time.monotonic()
            while True:
                _check_alive(procs)
                try:
                    version = monitor.receive(model, timeout=5.0).version
                    break
                except StreamError as exc:
                    if exc.reason != "timeout" or time.monotonic() - last > args.timeout:
                        raise
            val_loss = gpt.evaluate(model, val)
            if version >= args.versions:  # the clients end on the last version: their final pages
                _wait_for_exit(procs[1:], args.timeout)
            row = scraper.row(version, time.monotonic() - start, val_loss)
            rows.append(row)
            ratio = row.fp32_bytes / row.wire_bytes if row.wire_bytes else 0.0
            print(
                f"{row.version:>7} {row.seconds:>5.0f}s {row.val_loss:>8.3f} {row.wire_bytes / 1e6:>8.2f} "
                f"{row.fp32_bytes / 1e6:>8.2f} {ratio:>5.1f}x {row.aggregator_peak_rss / 2**20:>6.0f}MB "
                f"{row.client_peak_rss / 2**20:>8.0f}MB",
                flush=True,
            )
    return rows


def _check_alive(procs: list[subprocess.Popen[bytes]]) -> None:
    """A child that died with an error ends the run (a client that finished its last version exits 0)."""
    for p in procs:
        if p.poll() not in (None, 0):
            raise StreamError(f"process {p.pid} ({str(p.args)[:100]}...) exited with status {p.returncode}")


def _wait_for_exit(procs: list[subprocess.Popen[bytes]], timeout: float) -> None:
    """Wait for processes that are ending by themselves; a StreamError if one has not within ``timeout``."""
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise StreamError(f"process {p.pid} did not end after the last version") from None
    _check_alive(procs)


class _Scraper:
    """Reads the processes' /metrics pages, keeping each process's last values once it has exited; a process
    with a final page (``finals``, by port) that it has written is read from there instead."""

    def __init__(self, ports: list[int], finals: dict[int, Path]) -> None:
        self.ports = ports
        self.finals = finals
        self.last: dict[int, dict[str, float]] = {port: {} for port in ports}

    def values(self, port: int) -> dict[str, float]:
        final = self.finals.get(port)
        lines = final.read_text().splitlines() if final is not None and final.exists() else _scrape(port)
        if lines:  # counters and peaks only grow: a process that is gone keeps its final values
            self.last[port] = {
                "wire": _total(lines, "fedq_wire_bytes_total", 'direction="sent"'),
                "fp32": _total(lines, "fedq_fp32_equivalent_bytes_total", 'direction="sent"'),
                "rss": _total(lines, "fedq_process_peak_rss_bytes", ""),
            }
        return self.last[port]

    def row(self, version: int, seconds: float, val_loss: float) -> Row:
        aggregator = self.values(self.ports[0])
        clients = [self.values(port) for port in self.ports[1:]]
        return Row(
            version=version,
            seconds=seconds,
            val_loss=val_loss,
            wire_bytes=sum(c.get("wire", 0.0) for c in clients),
            fp32_bytes=sum(c.get("fp32", 0.0) for c in clients),
            aggregator_peak_rss=aggregator.get("rss", 0.0),
            client_peak_rss=max((c.get("rss", 0.0) for c in clients), default=0.0),
        )


def _scrape(port: int) -> list[str]:
    """The lines of a process's /metrics page; none when it has exited (its last values are then kept)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            return response.read().decode().splitlines()
    except OSError:
        return []


def _total(lines: list[str], name: str, label: str) -> float:
    """Sum of the samples of metric ``name`` whose labels contain ``label``."""
    total = 0.0
    for line in lines:
        if line.startswith(name + "{") and label in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def _write_results(args: argparse.Namespace, namespace: str, rows: list[Row]) -> list[Path]:
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stem = args.results_dir / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    settings = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not k.startswith("_")
    }
    data = {"namespace": namespace, "settings": settings, "versions": [asdict(r) for r in rows]}
    json_path = stem.with_suffix(".json")
    json_path.write_text(json.dumps(data, indent=1))
    png_path = stem.with_suffix(".png")
    _plot(png_path, rows, args)
    return [json_path, png_path]


def _plot(path: Path, rows: list[Row], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([r.wire_bytes / 1e6 for r in rows], [r.val_loss for r in rows], marker=".", label="global model")
    ax.set_xlabel(f"cumulative update bytes on the wire (MB, {args.codec})")
    ax.set_ylabel("validation loss")
    ax.set_title(f"fedq demo: {args.clients} clients, FedBuff K={args.buffer_size}, {args.split} split")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":  # python -m workers.demo ARGS is fedq demo ARGS
    sys.exit(fedq_main(["demo", *sys.argv[1:]]))

"""``make demo``'s quickest configuration, end to end: broker, aggregator and client processes, results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.broker
@pytest.mark.slow
def test_quick_demo_runs_end_to_end(amqp_url: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "workers.demo", "--quick", "--results-dir", str(tmp_path)],
        env={**os.environ, "FEDQ_AMQP_URL": amqp_url},
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    [result] = tmp_path.glob("demo-*.json")
    assert (tmp_path / result.name.replace(".json", ".png")).exists()
    versions = json.loads(result.read_text())["versions"]
    assert versions[0]["version"] == 0 and versions[-1]["version"] == 3
    assert versions[-1]["val_loss"] < versions[0]["val_loss"]
    assert versions[-1]["wire_bytes"] > 0
    assert versions[-1]["fp32_bytes"] > versions[-1]["wire_bytes"]
    assert versions[-1]["aggregator_peak_rss"] > 50 << 20 and versions[-1]["client_peak_rss"] > 50 << 20
    assert str(result) in done.stdout  # the launcher says where the results are


CLIENT = """
import sys
from pathlib import Path
from fedq import metrics
from workers.demo_client import write_metrics

metrics.serve(int(sys.argv[1]), "demo-test")
metrics.record_process("client")  # as fedq.Client does: the peak RSS gauge
def send(wire, fp32):
    metrics.WIRE_BYTES.labels("client", "sent", "nf4").inc(wire)
    metrics.FP32_BYTES.labels("client", "sent", "nf4").inc(fp32)
    metrics.WIRE_BYTES.labels("client", "received", "fp32").inc(10 * wire)  # downloads are not counted
send(1000, 7000)
print("sent", flush=True)
sys.stdin.readline()
send(500, 3500)  # the update that makes the last version; then the client ends, its endpoint with it
write_metrics(Path(sys.argv[2]))
"""


def test_the_last_line_counts_the_updates_that_made_the_last_version(tmp_path: Path) -> None:
    """The demo's clients end on the last version, before the launcher scores it: a table built from their
    endpoints alone repeated the line before's bytes; the final page each client writes gives the true
    counts. A process with real fedq counters plays the client; rows are built as the launcher builds them."""
    from workers import demo

    ports = [demo._free_port(), demo._free_port()]  # nothing answers on the aggregator's: it has ended too
    final = tmp_path / "client0.metrics"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT, str(ports[1]), str(final)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert client.stdout is not None and client.stdin is not None
    assert client.stdout.readline() == "sent\n"
    launcher, endpoints_only = demo._Scraper(ports, {ports[1]: final}), demo._Scraper(ports, {})
    rows = [launcher.row(1, 1.0, 3.0)]
    assert endpoints_only.row(1, 1.0, 3.0).wire_bytes == 1000
    client.stdin.write("\n")
    client.stdin.close()
    demo._wait_for_exit([client], timeout=60)
    rows.append(launcher.row(2, 2.0, 2.5))
    assert [(r.wire_bytes, r.fp32_bytes) for r in rows] == [(1000, 7000), (1500, 10500)]
    assert rows[1].client_peak_rss > 10 << 20  # the final page's peak RSS too
    assert endpoints_only.row(2, 2.0, 2.5).wire_bytes == 1000  # what the table showed before


def test_a_demo_client_starts_from_the_version_0_demo_init_writes(tmp_path: Path) -> None:
    # The walk of 2026-11-29: every client logged "the model differs from version 0: downloading", since
    # demo_init seeded the model and the client did not.
    import torch
    from safetensors.torch import load_file

    from fedq import cli
    from workers import demo_init, shakespeare
    from workers.demo_client import initial_model

    options = ["--n-embd", "32", "--n-layer", "1", "--n-head", "2"]
    assert demo_init.main([str(tmp_path / "v0.safetensors"), *options]) == 0
    written = load_file(tmp_path / "v0.safetensors")
    torch.rand(7)  # whatever the process drew before
    args = cli._parse(["client", *options])
    vocab = shakespeare.build_corpus(args.clients, args.split, args.seed).vocab
    client = initial_model(args, vocab.size).state_dict()
    assert written.keys() == client.keys()
    assert all(torch.equal(written[name], client[name]) for name in written)

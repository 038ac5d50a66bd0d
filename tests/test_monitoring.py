"""monitoring/ proven on a real Prometheus: the configuration and rules load, and every query returns data.

The slow test starts the real ``prometheus`` binary with a configuration generated from
monitoring/prometheus.yml (targets pointed at this test's workers and the local broker's prometheus plugin),
runs a short federated job with the real aggregator and client processes, and asks Prometheus's HTTP API
for every PromQL expression of the Grafana dashboard and of alerts.yml. An alert is checked through its
signals (the expression without its threshold, each side of an ``and``): a false condition returns nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client import Counter, Gauge, Histogram

from fedq import metrics
from fedq.broker import Management, q
from fedq.topology import Names

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "fedq.json"
FEDQ_JOBS = ("fedq-aggregator", "fedq-client", "fedq-demo")
RATE_INTERVAL = "30s"  # what Grafana's $__rate_interval becomes here, with a 1 s scrape interval


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed (Debian package prometheus; .ci/run installs it)")
    return path


# Expressions under test ---------------------------------------------------------------------------------


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def grafana_to_promql(expr: str, namespace: str) -> str:
    """Replace the dashboard's variables as Grafana would."""
    return expr.replace("$namespace", namespace).replace("$__rate_interval", RATE_INTERVAL)


def split_top_level(expr: str, operators: tuple[str, ...] = ("and", "or", "unless")) -> list[str]:
    """Split ``expr`` at set operators outside brackets and strings."""
    parts, depth, quote, start, i = [], 0, "", 0, 0
    while i < len(expr):
        c = expr[i]
        if quote:
            i += 2 if c == "\\" else 1
            quote = "" if c == quote else quote
            continue
        if c in "\"'`":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0 and (i == 0 or expr[i - 1].isspace()):
            match = re.match(r"({})\s".format("|".join(operators)), expr[i:])
            if match:
                parts.append(expr[start:i].strip())
                i += len(match.group(1))
                start = i
                continue
        i += 1
    parts.append(expr[start:].strip())
    return parts


def alert_signals(expr: str) -> list[str]:
    """What an alert compares with its thresholds, e.g. ``up{job="x"}`` for ``up{job="x"} == 0``."""
    threshold = re.compile(
        r"^(?P<signal>.*?)\s*(==|!=|>=|<=|>|<)\s*(bool\s+)?[-+]?[0-9.]+(e[-+]?[0-9]+)?$", re.S
    )
    signals = []
    for part in split_top_level(" ".join(expr.split())):
        match = threshold.match(part)
        signals.append(match.group("signal") if match else part)
    return signals


def exported_names() -> set[str]:
    """Every sample name fedq.metrics can export (``_total``, ``_bucket``... included)."""
    suffixes = {Counter: ("_total",), Gauge: ("",), Histogram: ("_bucket", "_sum", "_count")}
    names: set[str] = set()
    for value in vars(metrics).values():
        for kind, endings in suffixes.items():
            if isinstance(value, kind):
                names.update(value._name + ending for ending in endings)
    return names


# Fast checks: no Prometheus server needed ----------------------------------------------------------------


def test_promtool_accepts_the_config_and_the_rules() -> None:
    tool = promtool()
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"]):
        result = subprocess.run([tool, *args], cwd=MONITORING, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


def test_each_alert_fires_for_the_federation_in_trouble_named_by_its_namespace() -> None:
    # alerts_test.yml: two federations on one Prometheus. Until the walk of 2026-11-29 the staleness,
    # blocked-publisher and stalled-version alerts summed the namespace away.
    command = [promtool(), "test", "rules", "alerts_test.yml"]
    result = subprocess.run(command, cwd=MONITORING, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


def test_every_fedq_metric_in_dashboard_and_alerts_is_one_fedq_exports() -> None:
    rules = (MONITORING / "alerts.yml").read_text()
    used = set(re.findall(r"\bfedq_[a-z0-9_]+", rules + DASHBOARD.read_text()))
    assert used, "no fedq metric used"
    assert used - exported_names() == set()


def test_alert_signals_drop_thresholds_and_split_conditions() -> None:
    assert alert_signals('up{job="a"} == 0') == ['up{job="a"}']
    assert alert_signals("time() - max by (s) (x) > 1800") == ["time() - max by (s) (x)"]
    assert alert_signals('sum(a{q=~"x and y"}) > 1e3 and\n  deriv(b[5m]) > 0') == [
        'sum(a{q=~"x and y"})',
        "deriv(b[5m])",
    ]
    assert alert_signals("a / (b > 0)") == ["a / (b > 0)"]


def test_dashboard_is_importable_through_grafanas_ui_and_filters_by_namespace() -> None:
    """Grafana's import UI asks for each ``__inputs`` datasource; every panel then follows the ``datasource``
    variable, so no datasource uid is baked in; every fedq series is filtered by the namespace variable."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert [(i["type"], i["pluginId"]) for i in dashboard["__inputs"]] == [("datasource", "prometheus")]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    assert variables["datasource"]["current"]["value"] == f"${{{dashboard['__inputs'][0]['name']}}}"
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target.get("datasource", panel["datasource"])["uid"] == "${datasource}"
                for selector in re.findall(r"\bfedq_[a-z0-9_]+(\{[^}]*\})?", target["expr"]):
                    assert 'namespace="$namespace"' in selector, target["expr"]
    assert '"uid": "prometheus"' not in DASHBOARD.read_text()
    provider = (MONITORING / "grafana" / "provisioning" / "dashboards" / "fedq.yml").read_text()
    compose = (MONITORING / "docker-compose.yml").read_text()
    path = re.search(r"^\s*path:\s*(\S+)", provider, re.M)
    assert path and f"./grafana/dashboards:{path[1]}:ro" in compose


def test_docker_compose_mounts_files_that_exist() -> None:
    compose = (MONITORING / "docker-compose.yml").read_text()
    sources = re.findall(r"^\s*-\s*(\.\.?/[^:\s]+):", compose, re.M)
    assert {
        "./prometheus.yml",
        "./alerts.yml",
        "./grafana/provisioning",
        "./grafana/dashboards",
        "../broker_config/rabbitmq.conf",
        "../broker_config/definitions.json",
        "../broker_config/enabled_plugins",
    } <= set(sources)
    missing = [s for s in sources if not (MONITORING / s).exists()]
    assert missing == []
    plugins = (ROOT / "broker_config" / "enabled_plugins").read_text()
    assert "rabbitmq_prometheus" in plugins and "rabbitmq_management" in plugins


# A real Prometheus ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape_config(targets: dict[str, list[str]], broker: str) -> str:
    """monitoring/prometheus.yml with this test's targets, a 1 s interval and an absolute rules path."""
    text = (MONITORING / "prometheus.yml").read_text()
    text = re.sub(r"(scrape_interval|evaluation_interval): \S+", r"\1: 1s", text)
    text = text.replace("  - alerts.yml", f"  - {MONITORING / 'alerts.yml'}")
    text = text.replace("rabbitmq:15692", broker)
    for job in FEDQ_JOBS:
        block = re.compile(
            rf"(- job_name: {job}\n    static_configs:\n      - targets:)(.*?)(?=\n\n|\Z)", re.S
        )
        assert block.search(text), f"job {job} not found in prometheus.yml"
        text = block.sub(lambda m: m.group(1) + " " + json.dumps(targets.get(job, [])), text)  # noqa: B023
    return text


class Prometheus:
    """The real server on a free port with a temporary storage directory."""

    def __init__(self, config: str, workdir: Path) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        config_file = workdir / "prometheus.yml"
        config_file.write_text(config)
        check = subprocess.run(
            [promtool(), "check", "config", str(config_file)], capture_output=True, text=True
        )
        assert check.returncode == 0, check.stdout + check.stderr
        binary = shutil.which("prometheus")
        assert binary
        self.log = (workdir / "prometheus.log").open("w")
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={config_file}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address={self.url.removeprefix('http://')}",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"prometheus exited with {self.process.returncode}"
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise AssertionError("prometheus did not become ready in 60 s")

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.loads(response.read())
        except (
            urllib.error.HTTPError
        ) as exc:  # a query that does not parse is a 400 with the parser's message
            body = json.loads(exc.read())
        assert body["status"] == "success", f"{path} {params}: {body.get('error')}"
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return list(self.api("query", query=expr)["result"])

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self.log.close()


def has_finite_value(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(sample["value"][1])) for sample in result)


def missing_data(prometheus: Prometheus, exprs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The expressions whose result is empty or only NaN (one that does not parse fails the test at once)."""
    return [(where, expr) for where, expr in exprs if not has_finite_value(prometheus.query(expr))]


# The federated job ---------------------------------------------------------------------------------------


@contextmanager
def processes(commands: list[list[str]], logdir: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Start worker processes (each in its own process group); stop exactly those at the end."""
    started: list[subprocess.Popen[bytes]] = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        for n, command in enumerate(commands):
            log = (logdir / f"worker-{n}.log").open("wb")
            started.append(
                subprocess.Popen(
                    command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            )
        yield started
    finally:
        for process in started:
            if process.poll() is None:
                process.terminate()
        for process in started:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def logs(logdir: Path) -> str:
    return "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(logdir.glob("*.log"))
    )


def publish_garbage(management: Management, vhost: str, names: Names) -> None:
    """A message not in fedq's wire format: the aggregator must refuse it with a reason and dead-letter it."""
    body = {
        "properties": {},
        "routing_key": names.shard_key(0),
        "payload": "not a fedq chunk",
        "payload_encoding": "string",
    }
    result = management.post(f"/exchanges/{q(vhost)}/{q(names.updates_exchange)}/publish", body)
    assert result == {"routed": True}


# A tiny demo GPT so that the job makes several versions in seconds on two cores.
MODEL_ARGS = ["--clients", "2", "--n-embd", "32", "--n-layer", "1", "--n-head", "2", "--block-size", "32"]


def write_initial_model(path: Path) -> None:
    """Version 0 for the aggregator: the demo client's GPT with MODEL_ARGS, as the demo launcher makes it."""
    from fedq.cli import client as client_command
    from workers import demo_client, gpt, shakespeare

    parser = argparse.ArgumentParser()
    client_command.add_arguments(parser)
    args = parser.parse_args(MODEL_ARGS)
    vocab = shakespeare.build_corpus(args.clients, args.split, args.seed).vocab
    torch.manual_seed(args.seed)
    torch.save(gpt.GPT(demo_client.model_config(args, vocab.size)).state_dict(), path)


def federated_job(
    workdir: Path, amqp_url: str, namespace: str, aggregator_ports: list[int], client_ports: list[int]
) -> list[list[str]]:
    """The real aggregator workers (two shards, FedBuff, K = 2) and demo clients, each serving /metrics.

    Shard 1 is told that it may use 16 MiB (it uses some 15 times that): the near-budget alert must fire for
    it, and for no other process."""
    init = workdir / "init.pt"
    write_initial_model(init)
    common = ["--amqp-url", amqp_url, "--namespace", namespace, "--metrics-port"]
    shards = [
        [sys.executable, "-m", "workers.aggregator", *common, str(port),
         "--shard", str(shard), "--shards", "2",
         "--init", str(init), "--state-dir", str(workdir / f"aggregator-{shard}"),
         "--strategy", "fedbuff", "--buffer-size", "2", "--config", "local_steps=2",
         *(["--process-budget", "16MiB"] if shard else [])]
        for shard, port in enumerate(aggregator_ports)
    ]  # fmt: skip
    client = [sys.executable, "-m", "workers.demo_client", *MODEL_ARGS, "--batch-size", "8"]
    clients = [
        [*client, *common, str(port), "--name", f"client{n}", "--index", str(n), "--local-steps", "2"]
        for n, port in enumerate(client_ports)
    ]
    return [*shards, *clients]


def right_data(prometheus: Prometheus, namespace: str, over_budget: str) -> list[str]:
    """What the numbers must say, beyond "there is data"; an empty list when they all say it."""
    wrong = []
    alerts = prometheus.query('ALERTS{alertname="FedqWorkerNearMemoryBudget"}')
    if {a["metric"]["instance"] for a in alerts} != {over_budget}:
        wrong.append(f"near-budget alert for {[a['metric'] for a in alerts]}, want only {over_budget}")
    namespaces = {
        r["metric"].get("namespace") for r in prometheus.query("count by (namespace) ({__name__=~'fedq_.+'})")
    }
    if namespaces != {namespace}:
        wrong.append(f"fedq series in namespaces {namespaces}")
    received = prometheus.query(
        'sum(fedq_wire_bytes_total{role="aggregator", direction="received"}) '
        '/ sum(fedq_wire_bytes_total{role="client", direction="sent"})'
    )
    if not received or not 0.5 <= float(received[0]["value"][1]) <= 1.05:  # scrapes a second apart
        wrong.append(f"aggregator received / clients sent = {received}")
    ratio = prometheus.query(
        'sum(fedq_fp32_equivalent_bytes_total{role="client", direction="sent", codec="nf4"}) '
        '/ sum(fedq_wire_bytes_total{role="client", direction="sent", codec="nf4"})'
    )
    # nf4 is 4.13 bits a parameter (32 / 4.13 = 7.75); this tiny model's chunk headers take some of that
    if not ratio or not 5.0 <= float(ratio[0]["value"][1]) <= 7.75:
        wrong.append(f"nf4 compression ratio {ratio}")
    return wrong


@pytest.mark.broker
@pytest.mark.slow
def test_every_dashboard_and_alert_query_returns_data_on_a_real_prometheus(
    amqp_url: str, management: Management, vhost: str, namespace: str
) -> None:
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus not installed (Debian package prometheus; .ci/run installs it)")
    broker = f"{urllib.parse.urlsplit(amqp_url).hostname or '127.0.0.1'}:15692"
    names = Names(namespace)
    aggregator_ports, client_ports = [free_port(), free_port()], [free_port(), free_port()]
    with tempfile.TemporaryDirectory(prefix="fedq-prom-") as tmp:
        workdir = Path(tmp)
        commands = federated_job(workdir, amqp_url, namespace, aggregator_ports, client_ports)
        targets = {
            "fedq-aggregator": [f"127.0.0.1:{port}" for port in aggregator_ports],
            "fedq-client": [f"127.0.0.1:{port}" for port in client_ports],
        }
        rules_checked: list[tuple[str, str]] = []
        prometheus = Prometheus(scrape_config(targets, broker), workdir)
        try:
            with processes(commands, workdir) as workers:
                queries = [
                    (f"panel {title!r}", grafana_to_promql(e, namespace)) for title, e in dashboard_queries()
                ]
                rules = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
                assert len(rules) >= 7
                rules_checked = [(f"alert {r['name']}", s) for r in rules for s in alert_signals(r["query"])]
                # Every query parses, whatever the data: Prometheus answers 400 to one that does not.
                for _, expr in queries + rules_checked:
                    prometheus.query(expr)
                garbage_sent = False
                deadline = time.monotonic() + 240
                missing = queries + rules_checked
                while missing and time.monotonic() < deadline:
                    exited = [w.args for w in workers if w.poll() not in (None, 0)]
                    assert not exited, f"worker failed: {exited}\n{logs(workdir)}"
                    if not garbage_sent and prometheus.query(
                        f'rabbitmq_detailed_queue_consumers{{queue="{names.updates_queue(0)}"}} > 0'
                    ):
                        publish_garbage(management, vhost, names)
                        garbage_sent = True
                    time.sleep(2)
                    missing = missing_data(prometheus, missing)
                assert missing == [], f"queries without data: {missing}\n{logs(workdir)}"
                over_budget = f"127.0.0.1:{aggregator_ports[1]}"
                wrong = right_data(prometheus, namespace, over_budget)
                while wrong and time.monotonic() < deadline:
                    time.sleep(2)
                    wrong = right_data(prometheus, namespace, over_budget)
                assert wrong == [], f"{wrong}\n{logs(workdir)}"
                targets_down = [t for t in prometheus.api("targets")["activeTargets"] if t["health"] != "up"]
                assert targets_down == []
            bad_rules = [
                r["name"]
                for g in prometheus.api("rules")["groups"]
                for r in g["rules"]
                if r["health"] == "err"
            ]
            assert bad_rules == []
        finally:
            prometheus.stop()

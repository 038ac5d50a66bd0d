"""The ``fedq`` command as an operator meets it: help, version, one line per mistake with its exit code."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedq import cli

SECRET = "s3cret-Pa55"


def all_commands() -> list[list[str]]:
    return [list(words) for words, _ in cli.COMMANDS]


def run_fedq(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedq", *args], capture_output=True, text=True, timeout=120, env=env
    )


def test_building_every_parser_imports_neither_torch_nor_pika() -> None:
    code = (
        "import sys; from fedq import cli; cli.build_parser(); "
        "print(sorted(m for m in ('torch', 'pika', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("words", all_commands(), ids=" ".join)
def test_help_shows_no_password_and_each_default_once(
    words: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FEDQ_AMQP_URL", f"amqp://alice:{SECRET}@broker.example:5672/%2F")
    monkeypatch.setenv("FEDQ_MANAGEMENT_URL", f"http://admin:{SECRET}@broker.example:15672")
    with pytest.raises(SystemExit) as exit_:
        cli.main([*words, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert SECRET not in out
    for option in re.split(r"\n  (?=-)", out)[1:]:  # the help of each option, wrapped over lines
        assert option.count("default") <= 1, option
    if "--amqp-url" in out:
        assert "amqp://alice:***@broker.example:5672/%2F" in out


# value options whose absence means "not used" rather than a default value
_NO_DEFAULT = {"--config-file", "--init", "--config", "--json"}


@pytest.mark.parametrize("words", [["aggregator"], ["bench", "robust"], ["bench", "aggregate"]], ids=" ".join)
def test_every_strategy_and_rule_option_shows_its_default(
    words: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        cli.main([*words, "--help"])
    out = capsys.readouterr().out
    for option in re.split(r"\n  (?=-)", out)[1:]:
        flags = re.match(r"(-\S+(?:, -\S+)*)(?: (\S+))?", option)
        assert flags is not None
        metavar = flags.group(2) or ""
        takes_value = metavar.isupper() or metavar.startswith("{")  # not the first word of the help
        if takes_value and flags.group(1).split(", ")[-1] not in _NO_DEFAULT:
            assert "default" in option, option


def test_rule_and_optimizer_choices_match_the_implementations() -> None:
    from fedq.aggregation import robust, server_opt
    from fedq.cli import aggregation_rules

    assert aggregation_rules.RULES == robust.RULES
    assert ("none", *server_opt.NAMES) == aggregation_rules.SERVER_OPTS


def test_version_and_top_level_help_are_fast() -> None:
    version = run_fedq("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"fedq {cli.__version__}"
    helped = run_fedq("--help")
    assert helped.returncode == 0
    for words, _ in cli.COMMANDS:
        assert words[0] in helped.stdout
    assert "Exit codes:" in helped.stdout


def test_bench_choices_match_the_benchmarks() -> None:
    from fedq.bench import codecs, stream
    from fedq.cli import bench_codecs, bench_stream, client
    from workers import shakespeare

    assert sorted(bench_codecs.SHAPES) == sorted(codecs.SHAPES)
    assert sorted(bench_stream.SHAPES) == sorted(stream.SHAPES)
    assert bench_stream.MODES == stream.MODES
    assert client.SPLITS == shakespeare.SPLITS


def test_a_missing_file_is_one_line_and_exit_4(tmp_path: Path) -> None:
    missing = tmp_path / "missing.safetensors"
    result = run_fedq("send", str(missing), "--amqp-url", "memory://x")
    assert result.returncode == 4, result.stderr
    assert result.stderr.strip() == f"fedq send: error: {missing}: No such file or directory"


def test_a_full_state_directory_stops_the_aggregator_with_one_line_and_exit_4(tmp_path: Path) -> None:
    """The kernel's ENOSPC from inside the aggregator names the state directory and what to do (it was a bare
    'No space left on device'). Walked on a real 12 MiB tmpfs (docs/reliability.md): the shard stopped at a
    version's checkpoint and, restarted once there was room, resumed and re-applied its journaled plan."""
    init = tmp_path / "init.safetensors"
    state = tmp_path / "state"
    code = (
        "import errno, sys, torch\n"
        "from fedq.safetensors import save_file\n"
        "from fedq.aggregation import service\n"
        "from fedq.cli import main\n"
        f"save_file({{'w': torch.zeros(8)}}, {str(init)!r})\n"
        "def full(self, stop):\n"
        "    raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "service.Aggregator.run = full\n"
        f"sys.exit(main(['aggregator', '--amqp-url', 'memory://full', '--init', {str(init)!r}, "
        f"'--state-dir', {str(state)!r}]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 4, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"fedq aggregator: error: no room in {state}: No space left on device. The shard stopped; make room "
        "there and start it again: it resumes from its last checkpoint"
    )


@pytest.mark.parametrize("command", ["receive", "export"])
def test_an_output_file_that_cannot_be_written_is_refused_before_anything_is_received(
    command: str, tmp_path: Path
) -> None:
    """One line naming the operator's path (not a temporary file), exit 4, before waiting for a version."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cases = [(blocker / "model.safetensors", "Not a directory"), (tmp_path, "a directory is in the way")]
    for out, why in cases:
        where = ["--amqp-url", "memory://nothing", "--timeout", "30"] if command == "receive" else []
        started = time.monotonic()
        result = run_fedq(command, str(out), *where)
        assert result.returncode == 4, result.stderr
        assert result.stderr.strip() == f"fedq {command}: error: cannot write {out}: {why}"
        assert time.monotonic() - started < 20


def test_a_bad_setting_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = run_fedq("aggregator", "--init", str(tmp_path / "x.pt"), "--shard", "3", "--shards", "2")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == "fedq aggregator: error: --shard 3 outside 0..1"
    sized = run_fedq("receive", str(tmp_path / "out.safetensors"), "--memory-budget", "lots")
    assert sized.returncode == 2
    assert "argument --memory-budget: not a size: 'lots'" in sized.stderr


@pytest.mark.parametrize("codec", ["fp32", "nf4"])
def test_the_receive_bar_learns_its_total_from_each_manifest_and_it_matches_the_wire(
    codec: str, tmp_path: Path
) -> None:
    """The bar's total is what will cross the wire: each shard's manifest adds its container's size."""
    import torch

    from fedq.cli.progress import add_to_total, byte_bar
    from fedq.codecs import choose_codec
    from fedq.streaming import receive_file, send_container
    from fedq.topology import Names
    from fedq.transport import connect

    names = Names("bar")
    tensors = {"w": torch.randn(512, 512), "b": torch.randn(512)}
    with connect("memory://bar-test") as transport:
        transport.declare(names, 1)
        sent = send_container(
            transport, names.models_exchange, "", tensors, stream="s", meta={},
            codec_for=lambda n, t: choose_codec(n, tuple(t.shape), codec), chunk_bytes=64 << 10,
        )  # fmt: skip
        with byte_bar("receive", quiet=True) as bar:
            seen: list[int] = []
            receive_file(
                transport, names.models_stream, tmp_path / "out.safetensors", "s",
                consume_arguments={"x-stream-offset": "first"}, on_message=seen.append,
                on_manifest=lambda manifest: add_to_total(bar, manifest),
            )  # fmt: skip
    assert sent.wire_bytes * 0.95 <= bar.total <= sum(seen)  # the estimate leaves out headers, not payload

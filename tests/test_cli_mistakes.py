"""An operator's mistakes beyond a bad option (tests/test_cli.py): wrong values of the bench commands, a
broker that is down, a corrupt state directory. Each ends in one line on stderr and its exit code, never a
traceback (the walk-through of 2026-11-28 found one in each class)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedq import cli

DOWN = "amqp://guest:guest@127.0.0.1:5999/%2F"  # nothing listens there


def fedq(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """``fedq ARGV`` in this process: its exit status and the one line it wrote on stderr."""
    try:
        status = cli.main(list(argv))
    except SystemExit as exc:  # argparse's usage errors
        status = int(exc.code or 0)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines, err
    return status, lines[-1]


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["bench", "scale", "--clients", "10,abc"], "argument --clients: not comma-separated counts"),
        (["bench", "aggregate", "--clients", "0,8"], "argument --clients: not comma-separated counts"),
        (["bench", "round", "--clients", "0"], "argument --clients: not a whole number of at least 1"),
        (["bench", "round", "--codec", "nf5"], "argument --codec: invalid choice: 'nf5'"),
        (["bench", "round", "--model-codec", "fp4"], "argument --model-codec: invalid choice: 'fp4'"),
        (["bench", "round", "--shapes", "llama-9"], "argument --shapes: invalid choice: 'llama-9'"),
        (["bench", "stream", "--codec", "nf5"], "argument --codec: invalid choice: 'nf5'"),
        (["bench", "robust", "--dp-noise", "1,x"], "argument --dp-noise: not comma-separated numbers"),
        (["bench", "robust", "--attacks", "none,flip"], "--attacks: unknown ['flip']; choose from none"),
        (["bench", "robust", "--strategies", "fedmed"], "--strategies: unknown ['fedmed']; choose from"),
        (["bench", "quality", "--settings", "nf4,nf8"], "--settings: unknown ['nf8']; choose from fp32"),
        (["bench", "codecs", "--device", "gpu0"], "device 'gpu0': not a torch device"),
        (["bench", "device", "--device", "gpu0"], "device 'gpu0': not a torch device"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_a_wrong_bench_value_is_one_line_and_exit_2(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused before anything runs: a bench used to start (an aggregator writing a 5.7 GB model, a table of
    robust rules) and end in a ValueError, RuntimeError or KeyError traceback, or run nothing for a typo."""
    status, line = fedq(capsys, *argv)
    assert status == 2 and line.startswith(f"fedq {' '.join(argv[:2])}: error: ") and says in line, line


@pytest.mark.parametrize(
    "argv",
    [
        ["aggregator", "--shards", "2", "--sate-dir", "/var/lib/fedq"],
        ["broker", "add-client", "alice", "--rotaet"],
    ],
    ids=lambda v: " ".join(v),
)
def test_a_typo_in_an_option_names_the_command(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """The walk of 2026-11-29: a typo'd option ended in `fedq: error: ...` after the top-level usage."""
    status, line = fedq(capsys, *argv)
    command = " ".join(argv[: 2 if argv[0] == "broker" else 1])
    assert status == 2 and line.startswith(f"fedq {command}: error: unrecognized arguments: "), line
    assert argv[-1] in line


@pytest.mark.parametrize(
    "argv",
    [[], ["aggregator", "--shards", "x"], ["aggregator", "--sate-dir", "/x"], ["broker", "add-client"]],
    ids=lambda v: " ".join(v) or "no command",
)
def test_a_usage_mistake_is_one_line_that_names_the_help(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """The walk of 2026-11-29: argparse printed the command's whole usage (40 lines for the aggregator)
    above the error; now stderr is the error alone, and where to read the options."""
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    lines = capsys.readouterr().err.splitlines()
    prog = " ".join(["fedq", *argv[: 2 if argv[:1] == ["broker"] else 1]])
    assert exited.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"{prog}: error: ") and lines[0].endswith(f"(see '{prog} --help')"), lines


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "round", "--shapes", "tiny", "--clients", "1"],
        ["bench", "stream", "--shapes", "tiny"],
        ["bench", "scale", "--clients", "2"],
        ["bench", "aggregate", "--shapes", "gpt2", "--clients", "1"],
        ["bench", "quality", "--model", "llama", "--settings", "fp32"],
    ],
    ids=" ".join,
)
def test_a_bench_against_a_broker_that_is_down_is_one_line_and_exit_3(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """At once, as ``fedq send`` does: a bench used to start its aggregator and clients, each retrying for a
    minute, then end in a traceback (``bench round``) or in a page of pika's log lines."""
    status, line = fedq(capsys, *argv, "--amqp-url", DOWN)
    assert status == 3, line
    assert line == (
        f"fedq {' '.join(argv[:2])}: error: nothing accepts connections at 127.0.0.1:5999 (connection "
        "refused): is RabbitMQ running there?"
    )


@pytest.mark.parametrize(
    ("state", "says"),
    [("{trunc", "not the JSON fedq wrote there"), ('{"version": 3}', "not an aggregator's state")],
    ids=["not JSON", "not a state"],
)
def test_a_corrupt_state_directory_is_one_line_and_exit_4(
    state: str, says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``fedq export`` and an aggregator resuming from a state directory whose state.json is damaged name the
    file (a JSONDecodeError or KeyError traceback before); the aggregator before it touches the broker."""
    shard = tmp_path / "state" / "shard-0"
    shard.mkdir(parents=True)
    (shard / "state.json").write_text(state)
    out = tmp_path / "out.safetensors"
    status, line = fedq(capsys, "export", str(out), "--state-dir", str(tmp_path / "state"))
    assert status == 4 and line.startswith(f"fedq export: error: {shard / 'state.json'}: {says}"), line
    status, line = fedq(capsys, "aggregator", "--state-dir", str(tmp_path / "state"), "--amqp-url", DOWN)
    assert status == 4 and line.startswith(f"fedq aggregator: error: {shard / 'state.json'}: {says}"), line

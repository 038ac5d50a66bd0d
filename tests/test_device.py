"""The GPU paths' logic, run on whatever device is here (the CPU in CI): device selection, pinned/async copies
that are no-ops on the CPU, the double-buffering order of the aggregator's pipelined fold, deferred checks,
and results bit-for-bit equal to the existing paths."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import torch

from fedq.aggregation import fold
from fedq.aggregation.robust import Median
from fedq.aggregation.staging import StagingArea
from fedq.aggregation.strategies import FedBuff
from fedq.bench import device as bench_device
from fedq.bench.device import stage_updates
from fedq.codecs import ErrorFeedback, get_codec
from fedq.codecs.base import DeferredChecks, deferring, require
from fedq.device import ahead, host_buffer, resolve, to_device, to_host
from fedq.errors import CodecError, ConfigError
from fedq.protocol import Plan
from fedq.streaming import iter_container
from fedq.transport import connect
from tests.aggregation_helpers import (
    Worker,
    delta_for,
    memory_broker,
    model_of,
    send_update,
    settings,
    small_model,
    write_init,
)
from tests.test_codecs import CONFIGS, _values

DEVICE = resolve("auto")


def test_auto_is_cuda_where_torch_sees_one_else_the_cpu() -> None:
    assert resolve("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert resolve("cuda").type == "cuda"
    else:
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve("cuda")


def test_host_buffers_are_pinned_exactly_where_cuda_can_use_them() -> None:
    assert host_buffer(1024).is_pinned() == torch.cuda.is_available()


def test_ahead_stages_the_next_item_before_handing_on_this_one() -> None:
    events: list[str] = []

    def stage(i: int) -> int:
        events.append(f"stage {i}")
        return i

    for i in ahead(range(3), stage):
        events.append(f"use {i}")
    assert events == ["stage 0", "stage 1", "use 0", "stage 2", "use 1", "use 2"]
    assert list(ahead([], stage)) == []
    assert list(ahead([7], lambda i: i * 2)) == [14]


def test_copies_to_the_cpu_are_the_bytes_themselves() -> None:
    t = torch.arange(16, dtype=torch.uint8)
    data, flags = to_host(t, torch.tensor([True, False])).wait()
    assert bytes(data) == bytes(range(16)) and flags == [True, False]
    ready = to_device(memoryview(bytes(range(16))), torch.device("cpu")).ready()
    assert ready.tolist() == list(range(16))


@pytest.mark.parametrize("config", CONFIGS)
def test_encode_is_the_device_payload_copied_to_the_host(config: tuple[str, dict[str, Any]]) -> None:
    codec = get_codec(config[0], **config[1])
    x = _values(3, 70_001, "mixed", 0.02).to(DEVICE)
    meta, host = codec.encode(x)
    device_meta, payload = codec.encode_on_device(x)
    assert meta == device_meta and payload.device == x.device and payload.dtype == torch.uint8
    assert bytes(host) == payload.cpu().numpy().tobytes()
    # a decoder takes either, with the same result
    torch.testing.assert_close(
        codec.decode(meta, payload, x.numel(), DEVICE),
        codec.decode(meta, host, x.numel(), DEVICE),
        rtol=0,
        atol=0,
    )


def test_deferred_checks_are_read_together_and_name_what_failed() -> None:
    checks = DeferredChecks()
    checks.tag = "u1"
    checks.add(torch.tensor(True), lambda: CodecError("fine"))
    checks.tag = "u2"
    checks.add(torch.tensor(False), lambda: CodecError("bad scale"))
    failed = checks.failed()
    assert [(tag, str(err)) for tag, err in failed] == [("u2", "bad scale")]
    flags = checks.flags()
    assert flags is not None and flags.tolist() == [True, False]
    with pytest.raises(CodecError, match="bad scale"):
        checks.raise_failed([True, False])
    checks.raise_failed([True])  # only the checks the flags were taken over


def test_a_cpu_check_is_raised_at_once_even_inside_a_deferring_scope() -> None:
    with deferring() as checks, pytest.raises(CodecError, match="now"):
        require(torch.tensor(False), lambda: CodecError("now"))
    assert checks.failed() == []


def test_nan_is_refused_by_encode_on_every_device() -> None:
    x = torch.zeros(1 << 16, device=DEVICE)
    x[12345] = float("nan")
    for name in ("int8", "nf4"):
        with pytest.raises(CodecError, match="NaN or Inf"):
            get_codec(name).encode(x)


def test_the_sender_keeps_error_feedback_residuals_on_the_tensors_device() -> None:
    x = {"w": _values(5, 1 << 15, "normal", 0.02).view(128, 256).to(DEVICE)}
    feedback = ErrorFeedback()
    list(iter_container(x, stream="s", meta={}, codec_for=lambda n, t: get_codec("nf4"), feedback=feedback))
    residuals = list(feedback._residuals.values())
    assert residuals and all(r.device == x["w"].device for r in residuals)
    assert 0 < float(residuals[0].abs().max()) < 0.02


def _run(tmp_path: Path, options: dict[str, Any], pipelined: bool, monkeypatch: pytest.MonkeyPatch) -> Any:
    """One aggregator fold of four updates in mixed codecs, the fold pipelined (the GPU path) or not."""
    built, stage = fold.Folder.__init__, fold.Folder._stage
    staged: list[str] = []

    def init(self: fold.Folder, *args: Any, **kwargs: Any) -> None:
        built(self, *args, **kwargs)
        self.pipelined = pipelined

    def counted(self: fold.Folder, window: fold.Window) -> Any:
        staged.append(window[0])
        return stage(self, window)

    monkeypatch.setattr(fold.Folder, "__init__", init)
    monkeypatch.setattr(fold.Folder, "_stage", counted)
    x0 = small_model(scale=64)  # several chunks (windows) per tensor
    init_path = write_init(tmp_path, x0)
    broker, names = memory_broker(1)
    run = tmp_path / f"run-{pipelined}"
    strategy = FedBuff(buffer_size=4, server_lr=0.5, staleness="polynomial:0.5")
    config = settings(
        names, strategy, init_path, run, max_versions=1, chunk_bytes=1 << 16, device=DEVICE, **options
    )
    worker = Worker(f"memory://aggregator@{broker}", config)
    with connect(f"memory://client@{broker}") as client:
        for i, codec in enumerate(["fp32", "bf16", "int8", "nf4"]):
            delta = delta_for(i, x0)
            send_update(client, names, delta, shards=1, update_id=f"u{i}", base_version=0, codec=codec)
    worker.join(60)
    assert bool(staged) == pipelined  # the path under test is the one that ran
    return model_of(run), x0


@pytest.mark.parametrize("options", [{}, {"rule": Median()}], ids=["mean", "median"])
def test_the_pipelined_fold_gives_the_threaded_folds_model_bit_for_bit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, options: dict[str, Any]
) -> None:
    threaded, x0 = _run(tmp_path, options, False, monkeypatch)
    pipelined, _ = _run(tmp_path, options, True, monkeypatch)
    for name in x0:
        assert torch.equal(threaded[name], pipelined[name]), name
        assert not torch.equal(threaded[name], x0[name])


@pytest.mark.parametrize("pipelined", [False, True], ids=["threaded", "pipelined"])
def test_a_result_beyond_float32_is_refused_with_its_window_on_either_path(
    tmp_path: Path, pipelined: bool
) -> None:
    delta = {"a": torch.full((300_000,), 1e-3), "b": torch.full((200_000,), 3e38)}
    staging = StagingArea(tmp_path)
    entries = stage_updates(staging, delta, get_codec("fp32"), 2)
    model = {"a": torch.zeros(300_000, device=DEVICE), "b": torch.full((200_000,), 3e38, device=DEVICE)}
    folder = fold.Folder(model, staging, DEVICE, 1)
    folder.pipelined = pipelined
    plan = Plan(version=1, scale=1.0, updates=[e for e, _ in entries])
    with pytest.raises(fold.FoldError) as caught:
        folder.fold(entries, plan)
    assert caught.value.reason == "nonfinite_result"
    assert caught.value.window is not None and caught.value.window.name == "b"
    assert caught.value.window.lo == 0  # the first window it went wrong in, whatever the path
    staging.close()


def test_bench_device_prints_each_figure_on_the_device_found(capsys: pytest.CaptureFixture[str]) -> None:
    args = argparse.Namespace(shapes="lora-r4-w32", codec="nf4", updates=2, device="auto", threads=0)
    assert bench_device.run(args) == 0
    out = capsys.readouterr().out
    assert f"device {DEVICE}" in out
    for measure in ("| encode + copy | G elem/s |", "| send path | G elem/s |", "| fold | G params/s |"):
        assert measure in out

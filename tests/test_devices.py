"""The fold device: codecs, wire folding and the aggregator give on every device torch sees (CUDA where
present) what they give on the CPU. On a machine without a GPU the device list is the CPU alone, and these
tests check the CPU against itself through the device-generic code paths."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from fedq import wire
from fedq.aggregation.strategies import FedBuff
from fedq.codecs import get_codec
from fedq.transport import connect
from tests.aggregation_helpers import (
    Worker,
    assert_close,
    delta_for,
    memory_broker,
    model_of,
    send_update,
    settings,
    small_model,
    write_init,
)
from tests.test_codecs import CONFIGS, CPU, _values
from tests.test_codecs_fold import _assert_added

DEVICES = [CPU] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
SIZES = [4097, 3 * (1 << 20) + 5]  # an odd tail; several encode/fold steps


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("config", CONFIGS)
def test_codec_on_the_device_matches_the_cpu(
    config: tuple[str, dict[str, Any]], n: int, device: torch.device
) -> None:
    codec = get_codec(config[0], **config[1])
    x = _values(n, n, "mixed", 0.02)
    meta, payload = codec.encode(x.to(device))
    cpu_meta, cpu_payload = codec.encode(x)
    assert meta == cpu_meta
    reference = codec.decode(meta, payload, n, CPU)
    # A GPU may round a scale differently by an ulp (a scalar division runs as a multiply by its reciprocal,
    # a multiply-add fuses), which can move a value across a code boundary: rare, and no less accurate.
    cpu_decoded = codec.decode(cpu_meta, cpu_payload, n, CPU)
    moved = (reference - cpu_decoded).abs() > 1e-5 * cpu_decoded.abs() + 1e-30
    assert int(moved.sum()) <= max(2, n // 1000)
    assert float((reference - x).norm()) <= 1.001 * float((cpu_decoded - x).norm()) + 1e-30
    decoded = codec.decode(meta, payload, n, device)
    assert decoded.device.type == device.type
    torch.testing.assert_close(decoded.cpu(), reference, rtol=1e-6, atol=0)
    base = _values(n + 1, n, "normal", 0.02)
    out = base.to(device, copy=True)
    codec.decode_add(meta, payload, n, out, -0.75)
    _assert_added(out.cpu(), base, -0.75, reference)
    assert codec.sq_norm(meta, payload, n, device) == pytest.approx(codec.sq_norm(meta, payload, n), rel=1e-6)
    codec.check(meta, payload, n, device)  # a valid payload passes the arrival check on the device too


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("name", ["fp32", "bf16", "int8", "nf4"])
def test_wire_chunk_folds_on_the_device(name: str, device: torch.device) -> None:
    x = _values(7, 10_000, "normal", 0.1)
    msg = wire.decode(
        wire.encode_chunk(
            stream="s",
            index=0,
            name="w",
            dtype=torch.float32,
            shape=(100, 100),
            offset=0,
            count=x.numel(),
            codec=get_codec(name),
            x=x,
        )
    )
    reference = wire.decode_tensor(msg)
    out = torch.ones(x.numel(), device=device)
    wire.add_tensor(msg, out, 2.0)
    _assert_added(out.cpu(), torch.ones(x.numel()), 2.0, reference.reshape(-1))
    assert wire.chunk_sq_norm(msg, device) == pytest.approx(wire.chunk_sq_norm(msg), rel=1e-6)


def test_aggregator_folds_on_every_device_to_the_same_model(tmp_path: Path) -> None:
    """FedBuff over mixed codecs and a staleness weight, run once per device: every model within 1e-6."""
    x0 = small_model(scale=64)  # tensors of ~100k-400k parameters, several chunks each
    deltas = [delta_for(i, x0) for i in range(4)]
    codecs = ["fp32", "bf16", "int8", "nf4"]
    init = write_init(tmp_path, x0)
    models = []
    for device in DEVICES:
        broker, names = memory_broker(1)
        run = tmp_path / device.type
        strategy = FedBuff(buffer_size=2, server_lr=0.5, staleness="polynomial:0.5")
        worker = Worker(
            f"memory://aggregator@{broker}",
            settings(names, strategy, init, run, max_versions=2, chunk_bytes=1 << 16, device=device),
        )
        with connect(f"memory://client@{broker}") as client:
            for i, (delta, codec) in enumerate(zip(deltas, codecs, strict=True)):
                send_update(client, names, delta, shards=1, update_id=f"u{i}", base_version=0, codec=codec)
        worker.join(60)
        models.append(model_of(run))
    for model in models[1:]:
        assert_close(model, models[0])
    assert not torch.equal(models[0]["embed"], x0["embed"])

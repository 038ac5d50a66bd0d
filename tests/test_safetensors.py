"""safetensors reading (mmap, tensor by tensor) and slice-by-slice writing."""

from __future__ import annotations

import itertools
import json
import os
import struct
from pathlib import Path

import pytest
import torch

from fedq.errors import StreamError
from fedq.metrics import current_rss_bytes
from fedq.safetensors import SafetensorsReader, SafetensorsWriter, TensorSpec, layout, save_file


def _hand_made(path: Path) -> dict[str, torch.Tensor]:
    """A file built from the public format description alone, its header laid out as other writers do."""
    a = torch.arange(6, dtype=torch.float32).reshape(2, 3) / 4
    b = torch.tensor([1.5, -2.0], dtype=torch.bfloat16)
    c = torch.tensor(3.0, dtype=torch.float16)
    header = {
        "__metadata__": {"format": "pt"},
        "b": {"dtype": "BF16", "shape": [2], "data_offsets": [24, 28]},
        "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "c": {"dtype": "F16", "shape": [], "data_offsets": [28, 30]},
    }
    text = json.dumps(header).encode()
    data = (
        struct.pack("<6f", *a.flatten().tolist())
        + b.view(torch.int16).numpy().tobytes()
        + c.view(torch.int16).numpy().tobytes()
    )
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return {"a": a, "b": b, "c": c}


def test_reads_a_hand_made_file(tmp_path: Path) -> None:
    expected = _hand_made(tmp_path / "m.safetensors")
    with SafetensorsReader(tmp_path / "m.safetensors") as reader:
        assert list(reader) == ["a", "b", "c"]  # file order
        assert reader.metadata == {"format": "pt"}
        for name, t in expected.items():
            assert reader[name].dtype == t.dtype and torch.equal(reader[name], t)


def test_write_then_read_round_trip(tmp_path: Path) -> None:
    tensors = {
        "w": torch.randn(33, 7),
        "h": torch.randn(5).half(),
        "b": torch.randn(2, 2, 3).bfloat16(),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(7.0),
    }
    path = save_file(tensors, tmp_path / "m.safetensors", {"version": "3"})
    raw = path.read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    assert (8 + header_len) % 8 == 0
    header = json.loads(raw[8 : 8 + header_len])
    assert header["w"] == {"dtype": "F32", "shape": [33, 7], "data_offsets": [0, 924]}
    assert header["h"]["data_offsets"] == [924, 934]
    assert len(raw) == 8 + header_len + 924 + 10 + 24 + 0 + 4
    reader = SafetensorsReader(path)
    assert reader.metadata == {"version": "3"}
    assert all(torch.equal(reader[n], t) for n, t in tensors.items())


def test_writer_slices_in_any_order_give_the_same_bytes(tmp_path: Path) -> None:
    tensors = {"a": torch.randn(1000), "b": torch.randn(10, 10).half()}
    reference = save_file(tensors, tmp_path / "ref.safetensors").read_bytes()
    writer = SafetensorsWriter(
        tmp_path / "out.safetensors", {n: TensorSpec(t.dtype, tuple(t.shape)) for n, t in tensors.items()}
    )
    assert (tmp_path / "out.safetensors.part").exists() and not (tmp_path / "out.safetensors").exists()
    writer.write("b", 50, tensors["b"].reshape(-1)[50:].float())  # cast back to the tensor's dtype on write
    writer.write("a", 500, tensors["a"][500:])
    writer.write("b", 0, tensors["b"].reshape(-1)[:50])
    writer.write("a", 0, tensors["a"][:500])
    with pytest.raises(StreamError):
        writer.write("a", 999, tensors["a"][:2])
    assert writer.commit().read_bytes() == reference
    assert not (tmp_path / "out.safetensors.part").exists()


def _direct_io_supported(directory: Path) -> bool:
    probe = directory / "probe"
    probe.write_bytes(b"")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_DIRECT))
        return True
    except OSError:
        return False
    finally:
        probe.unlink()


def test_direct_runs_and_scattered_slices_give_the_file_bytes(tmp_path: Path) -> None:
    """In-order slices go through O_DIRECT runs (several 8 MiB buffers, unaligned starts and ends),
    out-of-order ones through the page cache; the file is exactly the format's bytes either way."""
    gen = torch.Generator().manual_seed(5)
    tensors = {
        "a": torch.randn(3_000_001, generator=gen),
        "b": torch.randn(100_001, generator=gen).bfloat16(),
        "c": torch.randn(777, generator=gen),
    }
    specs = {n: TensorSpec(t.dtype, tuple(t.shape)) for n, t in tensors.items()}
    expected = layout(specs) + b"".join(t.view(torch.uint8).numpy().tobytes() for t in tensors.values())
    writer = SafetensorsWriter(tmp_path / "out.safetensors", specs)
    assert (writer._run is not None) == _direct_io_supported(tmp_path)
    a, b, c = (t.reshape(-1) for t in tensors.values())
    cuts = [0, 1, 4097, 1_000_003, 2_500_000, 3_000_001]
    writer.write("c", 700, c[700:])  # before anything else
    for lo, hi in itertools.pairwise(cuts):
        writer.write("a", lo, a[lo:hi])
    writer.write("b", 60_000, b[60_000:])  # out of order, then its run is broken by the next
    writer.write("b", 0, b[:60_000])
    writer.write("c", 0, c[:700])
    assert writer.commit().read_bytes() == expected


def test_abort_leaves_nothing(tmp_path: Path) -> None:
    writer = SafetensorsWriter(tmp_path / "x.safetensors", {"a": TensorSpec(torch.float32, (10,))})
    writer.abort()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "header",
    [
        {"a": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}},
        {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
        {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},  # beyond the data
        {"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 8]}},
        {"a": {"dtype": "F32", "shape": [2]}},
        {"__metadata__": {"x": 1}},
        [1, 2],
    ],
)
def test_rejects_malformed_files(tmp_path: Path, header: object) -> None:
    text = json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"\0" * 8)
    with pytest.raises(StreamError) as info:
        SafetensorsReader(path)
    assert info.value.reason == "bad_file"


def test_rejects_truncated_and_lying_lengths(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    for data in (b"", b"\x01\x00", struct.pack("<Q", 1 << 40) + b"{}", struct.pack("<Q", 2) + b"{x"):
        path.write_bytes(data)
        with pytest.raises(StreamError):
            SafetensorsReader(path)


def test_release_gives_the_pages_back(tmp_path: Path) -> None:
    """Streaming a file must not grow RSS with the file: pages of a sent slice are dropped."""
    n = 16 << 20  # 64 MiB of float32
    path = save_file({"big": torch.ones(n)}, tmp_path / "big.safetensors")
    reader = SafetensorsReader(path)
    before = current_rss_bytes()
    assert float(reader["big"].sum()) == n  # touches every page
    touched = current_rss_bytes()
    step = 1 << 20
    for lo in range(0, n, step):
        reader.release("big", lo, step)
    released = current_rss_bytes()
    assert touched - before > 60 << 20
    assert touched - released > 60 << 20
    assert float(reader["big"][-5:].sum()) == 5.0  # still readable after the release


def test_stream_reads_slices_from_disk_as_the_map_shows_them(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(2)
    tensors = {
        "h": torch.randn(1001, generator=gen).half(),  # odd: the next tensor starts off a 4-byte boundary
        "w": torch.randn(5000, generator=gen),
        "e": torch.zeros(0),
    }
    path = save_file(tensors, tmp_path / "m.safetensors")
    slices = [("w", 4999, 1), ("h", 0, 1001), ("w", 0, 3), ("e", 0, 0), ("w", 1234, 2000), ("h", 7, 0)]
    with SafetensorsReader(path) as reader:
        got = [t.clone() for t in reader.stream(slices)]
        want = [reader[n].reshape(-1)[o : o + c] for n, o, c in slices]
        assert all(g.dtype == w.dtype and torch.equal(g, w) for g, w in zip(got, want, strict=True))
        with pytest.raises(StreamError):
            list(reader.stream([("w", 4990, 11)]))

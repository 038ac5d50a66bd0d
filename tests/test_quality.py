"""``fedq bench quality`` on a tiny configuration: the table's rows, keys and byte ratios."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedq.cli import bench_quality


def test_quality_bench_writes_rows_with_real_wire_bytes(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    bench_quality.add_arguments(parser)
    out = tmp_path / "quality.json"
    args = parser.parse_args(
        [
            *(
                "--rounds",
                "2",
                "--local-steps",
                "2",
                "--n-embd",
                "64",
                "--n-layer",
                "1",
                "--block-size",
                "32",
            ),
            *("--batch-size", "8", "--eval-batches", "1", "--threads", "1"),
            *(
                "--settings",
                "fp32,int8,nf4+ef,central",
                "--json",
                str(out),
                "--plot",
                str(tmp_path / "q.png"),
            ),
        ]
    )
    assert bench_quality.run(args) == 0
    rows = {r["setting"]: r for r in json.loads(out.read_text())["results"]}
    assert list(rows) == ["fp32", "int8", "nf4+ef", "central"]
    assert all({"setting", "val_loss", "wire_bytes"} <= set(r) for r in rows.values())
    fp32 = rows["fp32"]
    # 2 rounds x 4 clients of a 59,712-parameter model: 8 x 4 bytes x params, plus headers and manifests
    assert fp32["fp32_equivalent_bytes"] == 8 * 4 * 59_712
    assert 1.0 < fp32["wire_bytes"] / fp32["fp32_equivalent_bytes"] < 1.02
    # the 1-D norm weights and every tensor under 4096 elements (pos: 32 x 64) stay fp32 in every setting
    assert 0.25 < rows["int8"]["bytes_vs_fp32"] < 0.30
    assert 0.13 < rows["nf4+ef"]["bytes_vs_fp32"] < 0.18
    assert rows["central"]["wire_bytes"] == 0
    for r in rows.values():  # every setting learned from the uniform 4.17
        assert r["val_loss"] < 4.1
    assert abs(rows["int8"]["val_loss"] / fp32["val_loss"] - 1) < 0.005
    assert (tmp_path / "q.png").stat().st_size > 10_000

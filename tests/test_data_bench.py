"""`maestro bench data`: loader throughput beside per-file source reads of the same archive."""

from __future__ import annotations

import json
import os

import pytest

from maestro.cli import main
from shards.synth import write_synthetic
from shards.synth_source import write_treesatai_source


def test_bench_data_reports_loader_and_source_side_by_side(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "shards"
    write_treesatai_source(src, 6, seed=0, max_dates=20)
    assert main(["shards", "convert", "treesatai_ts", str(src), str(out), "--split", "train"]) == 0
    capsys.readouterr()
    args = ["bench", "data", str(out / "train"), "--workers", "0", "--batches", "2", "--batch-size", "2"]
    assert main([*args, "--source", str(src), "--reader", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["loader"]["samples"] == 4 and report["source"]["samples"] == 4
    reader = report["reader"]  # the read path alone, indexed against the old sequential reader
    assert reader["indexed"]["samples"] == reader["sequential"]["samples"] == 6
    assert reader["indexed"]["mb_per_s"] / reader["indexed"]["samples_per_s"] == pytest.approx(
        reader["sequential"]["mb_per_s"] / reader["sequential"]["samples_per_s"]
    )  # the same member bytes
    assert reader["indexed_vs_sequential"] > 0
    for part in ("loader", "source"):
        assert report[part]["samples_per_s"] > 0 and report[part]["mb_per_s"] > 0
    assert report["loader"]["decode_ms_per_sample"] > 0
    assert report["speedup"] > 0 and report["speedup_per_core"] > 0


def test_bench_data_runs_one_side_alone(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "shards"
    write_treesatai_source(src, 4, seed=0, max_dates=20)
    assert main(["shards", "convert", "treesatai_ts", str(src), str(out), "--split", "train"]) == 0
    args = ["bench", "data", str(out / "train"), "--workers", "0", "--batches", "2", "--batch-size", "2"]
    for side, other in (("loader", "source"), ("source", "loader")):
        capsys.readouterr()
        assert main([*args, "--source", str(src), "--only", side, "--json"]) == 0
        report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert report[side]["samples"] == 4 and other not in report and "speedup" not in report


def test_bench_data_pinned_path_and_s3_latency_side_by_side(tmp_path, capsys, monkeypatch):
    """`--simulate-pin` runs the GPU run's pinned path on CPU; `--s3-latency-ms` streams the same split
    from a moto S3 server behind a latency proxy and reports it against local disk."""
    for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k, raising=False)
    write_synthetic(str(tmp_path), "treesatai_ts", 8, seed=0, max_dates=6, shard_samples=4)
    args = ["bench", "data", str(tmp_path / "train"), "--workers", "2", "--batches", "2", "--batch-size", "2"]
    assert main([*args, "--simulate-pin", "--s3-latency-ms", "5", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["pinning"] == "simulated"
    assert report["loader"]["samples"] == report["s3"]["samples"] == 4 and report["s3"]["latency_ms"] == 5
    assert report["s3_vs_local"] > 0
    assert "AWS_ENDPOINT_URL" not in os.environ  # the local endpoint is gone with the bench

"""``knitwatch bench model``: variant parsing, the peak estimate, and one tiny real run (one worker process)."""

from __future__ import annotations

import json

import pytest

from knitwatch.daemon.bench.model import Variant, cpu_peak_gflops, format_table, parse_variant
from knitwatch.daemon.cli.main import main


def test_parse_variant():
    assert parse_variant("fp32") == Variant("fp32", "torch", "fp32", False)
    assert parse_variant("bf16-cl") == Variant("bf16-cl", "torch", "bf16", True)
    assert parse_variant("compile-fp16-cl") == Variant("compile-fp16-cl", "compile", "fp16", True)
    assert parse_variant("ort").backend == "onnxruntime"
    assert parse_variant("compile-fp32").label == "torch.compile fp32 NCHW"
    for bad in ("fp64", "cl", "compile", "fp32-cl-cl", "int8"):
        with pytest.raises(ValueError, match="unknown variant"):
            parse_variant(bad)


def test_cpu_peak_estimate_states_its_assumption():
    peak, words = cpu_peak_gflops(2)
    assert peak > 0
    assert "GHz" in words and "FLOP/cycle" in words


def test_tiny_run_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["--log-level", "ERROR", "bench", "model", "--model", "efficientad-s", "--tile", "40", "--batch", "2",
                 "--reps", "2", "--warmup", "1", "--variants", "fp32,fp16", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "tiles/s" in text and "random-initialised weights" in text
    data = json.loads(out.read_text())
    ok, skipped = data["results"]
    assert ok["status"] == "ok" and ok["tiles_per_s"] > 0 and len(ok["latencies_ms"]) == 2
    assert ok["p99_ms"] >= ok["p50_ms"] > 0 and ok["peak_rss_mb"] > ok["rss_baseline_mb"] > 0
    assert ok["gflop_per_tile"] > 0 and 0 < ok["peak_fraction"] < 1 and ok["map_max_rel_diff"] == 0.0
    assert skipped["status"] == "skipped" and "CUDA" in skipped["note"]
    assert "skipped" not in format_table([ok]) and "fp16 autocast needs CUDA" in format_table([skipped])


def test_bad_input_exit_code_2(tmp_path, capsys):
    assert main(["bench", "model", "--model", "efficientad-x"]) == 2
    assert main(["bench", "model", "--variants", "fp64"]) == 2
    assert main(["bench", "model", str(tmp_path / "missing.ckpt")]) == 2
    assert "unknown model kind" in capsys.readouterr().err

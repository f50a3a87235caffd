"""ONNX export and the onnxruntime inference backend: parity with PyTorch (maps, scores, decisions at the
stored thresholds) for EfficientAD-S and MSFlow-Lite0 on small simulated tiles."""

from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

from knitwatch.daemon.cli import export as cmd_export  # noqa: E402
from knitwatch.daemon.cli.common import CliError  # noqa: E402
from knitwatch.models.base import save_model  # noqa: E402
from knitwatch.models.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from knitwatch.models.efficientad.model import EfficientAD  # noqa: E402
from knitwatch.models.efficientad.train import calibrate  # noqa: E402
from knitwatch.models.export import (  # noqa: E402
    TileGraph,
    check_parity,
    checkpoint_sha256,
    compare_outputs,
    default_onnx_path,
    onnx_metadata,
    parity_problems,
)
from knitwatch.models.msflow.train import train_msflow  # noqa: E402
from knitwatch.pipeline import detector as detector_mod  # noqa: E402
from knitwatch.pipeline.detector import OnnxTileModel, load_detector  # noqa: E402
from knitwatch.pipeline.sources.knitsim import FabricSpec, render_sample  # noqa: E402

TILE = 64


@pytest.fixture(scope="module")
def tiles():
    spec = FabricSpec(pitch_px=6)
    normal = np.stack([render_sample(TILE, TILE, spec, s, defect=None)[0] for s in range(16)])
    test_normal = np.stack([render_sample(TILE, TILE, spec, 900 + s, defect=None)[0] for s in range(6)])
    holes = np.stack([render_sample(TILE, TILE, spec, 700 + s, defect="hole")[0] for s in range(6)])
    return normal, np.concatenate([test_normal, holes])


@pytest.fixture(scope="module")
def ead_ckpt(tiles, tmp_path_factory):
    """EfficientAD-S (seeded random networks) with quantiles and thresholds calibrated on normal tiles."""
    normal, _ = tiles
    torch.manual_seed(0)
    model = EfficientAD("s", TILE)
    calibrate(model, torch.from_numpy(normal)[:, None])
    return save_model(tmp_path_factory.mktemp("ead") / "ead.ckpt", model,
                      preprocess={"tile": TILE, "grayscale": True}, provenance={"id": "ead-test"})


@pytest.fixture(scope="module")
def msf_ckpt(tiles, tmp_path_factory):
    normal, _ = tiles
    model, _ = train_msflow(normal, backbone="efficientnet-lite0", steps=3, batch_size=8, flow_blocks=(1, 1, 1),
                            val_fraction=0.25, progress=False)
    return save_model(tmp_path_factory.mktemp("msf") / "msf.ckpt", model,
                      preprocess={"tile": TILE, "grayscale": True}, provenance={"id": "msf-test"})


def _export_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    cmd_export.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_tile_graph_matches_predict_gray_and_colour():
    torch.manual_seed(0)
    model = EfficientAD("s", 40).eval()
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (3, 40, 40), dtype=np.uint8)
    rgb = rng.integers(0, 256, (3, 40, 40, 3), dtype=np.uint8)
    for arr, grayscale in ((gray, True), (rgb, False)):
        ref_maps, ref_scores = model.predict(arr)
        with torch.inference_mode():
            for x in (torch.from_numpy(arr), torch.from_numpy(arr).float()):  # uint8 or float 0..255
                maps, scores = TileGraph(model, grayscale)(x)
                np.testing.assert_allclose(maps.numpy(), ref_maps, rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(scores.numpy(), ref_scores, rtol=1e-5, atol=1e-6)


def test_msflow_export_cli_parity(msf_ckpt, tiles, capsys):
    assert _export_cli(["export", str(msf_ckpt), "--json"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out[out.index("{\n"):])  # (structlog prints to stdout when logging is not set up)
    onnx_path = default_onnx_path(msf_ckpt)
    assert report["path"] == str(onnx_path) and onnx_path.is_file() and report["parity_ok"] is True
    meta = onnx_metadata(onnx_path)
    assert meta["kind"] == "msflow-efficientnet-lite0"
    assert meta["checkpoint_sha256"] == checkpoint_sha256(msf_ckpt)
    ckpt = load_checkpoint(msf_ckpt)
    assert json.loads(meta["thresholds"]) == ckpt.thresholds

    # simulated fabric with holes, at the stored thresholds
    parity = check_parity(ckpt, onnx_path, tiles=tiles[1])
    assert parity["max_rel_map"] < 1e-4, parity
    assert parity["image_decisions"]["differ"] == 0 and parity["pixel_decisions"]["differ"] == 0, parity
    # dynamic batch, and an empty one
    ort_model = OnnxTileModel(onnx_path)
    for n in (1, 7):
        maps, scores = ort_model.predict(tiles[1][:n])
        assert maps.shape == (n, TILE, TILE) and scores.shape == (n,) and maps.dtype == np.float32
    assert ort_model.predict(tiles[1][:0])[0].shape == (0, TILE, TILE)
    with pytest.raises(ValueError, match="tiles must be"):
        ort_model.predict(np.zeros((2, 32, 32), np.uint8))


def test_efficientad_onnxruntime_backend(ead_ckpt, tiles, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("CACHE_DIRECTORY", raising=False)
    torch_det = load_detector(ead_ckpt, "cpu", "torch")
    det = load_detector(ead_ckpt, "cpu", "onnxruntime")  # no export beside it: exported into the cache now
    cached = tmp_path / "cache" / "knitwatch" / "onnx" / f"ead-{checkpoint_sha256(ead_ckpt)[:16]}.onnx"
    assert det.backend == "onnxruntime" and det.info["onnx"] == str(cached) and cached.is_file()
    assert det.thresholds == torch_det.thresholds and det.preprocess == torch_det.preprocess
    det.warm_up()

    test = tiles[1]
    ref = torch_det.predict(test)
    got = det.predict(test)
    parity = compare_outputs(ref, got, det.thresholds)
    assert parity["max_rel_map"] < 1e-4, parity
    assert parity["image_decisions"]["differ"] == 0 and parity["pixel_decisions"]["differ"] == 0, parity
    assert 0 < parity["image_decisions"]["positive"] < len(test)  # the check is not trivially all-or-none

    class NoExport(Exception):
        pass

    def no_export(*a, **k):
        raise NoExport

    monkeypatch.setattr("knitwatch.models.export.export_checkpoint", no_export)
    assert load_detector(ead_ckpt, "cpu", "onnxruntime").info["onnx"] == str(cached)  # the cache is reused
    beside = default_onnx_path(ead_ckpt)
    shutil.copy(cached, beside)
    try:
        assert load_detector(ead_ckpt, "cpu", "onnxruntime").info["onnx"] == str(beside)  # next to it first
        # a checkpoint that differs from the one the ONNX file was made from: the file is not used
        other = save_model(tmp_path / "other.ckpt", EfficientAD("s", TILE), preprocess={"tile": TILE})
        shutil.copy(cached, default_onnx_path(other))
        with pytest.raises(NoExport):
            load_detector(other, "cpu", "onnxruntime")
    finally:
        beside.unlink()


def test_auto_backend(ead_ckpt, tmp_path, monkeypatch):
    """auto: ONNX Runtime on a CPU when installed, PyTorch when it is missing or the export fails."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert load_detector(ead_ckpt, "cpu", "auto").backend == "onnxruntime"

    with monkeypatch.context() as m:
        m.setattr(detector_mod, "onnxruntime_installed", lambda: False)
        assert load_detector(ead_ckpt, "cpu", "auto").backend == "torch"

    # an on-the-fly export that disagrees with PyTorch is deleted, an error for the onnxruntime
    # backend and a fallback to torch for auto
    def bad_parity(*a, **k):
        return {"max_rel_map": 0.5, "max_abs_map": 1.0, "image_decisions": {"differ": 3}, "pixel_decisions": None}

    with monkeypatch.context() as m:
        m.setenv("XDG_CACHE_HOME", str(tmp_path / "parity-cache"))
        m.setattr("knitwatch.models.export.check_parity", bad_parity)
        with pytest.raises(RuntimeError, match="disagrees with PyTorch: maps differ.*3 image decision"):
            load_detector(ead_ckpt, "cpu", "onnxruntime")
        assert not list((tmp_path / "parity-cache").rglob("*.onnx"))
        assert load_detector(ead_ckpt, "cpu", "auto").backend == "torch"

    def broken_export(*a, **k):
        raise RuntimeError("exporter cannot take this model")

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.setattr("knitwatch.models.export.export_checkpoint", broken_export)
    det = load_detector(ead_ckpt, "cpu", "auto")
    assert det.backend == "torch" and det.predict(np.full((2, TILE, TILE), 128, np.uint8))[0].shape == (2, TILE, TILE)
    with pytest.raises(CheckpointError, match="no such checkpoint"):  # not hidden behind the fallback
        load_detector(tmp_path / "missing.ckpt", "cpu", "auto")


def test_backend_and_cli_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="backend"):
        load_detector(tmp_path / "x.ckpt", "cpu", "tensorflow")
    with pytest.raises(CliError) as e:
        _export_cli(["export", str(tmp_path / "missing.ckpt")])
    assert e.value.code == 2
    monkeypatch.setenv("CACHE_DIRECTORY", f"{tmp_path}/svc:{tmp_path}/other")
    assert detector_mod.onnx_cache_dir() == tmp_path / "svc" / "onnx"


def test_parity_report_flags_differences():
    maps = np.zeros((2, 4, 4), np.float32)
    maps[1] = 1.0
    scores = np.array([0.2, 0.8], np.float32)
    same = compare_outputs((maps, scores), (maps.copy(), scores.copy()), {"image": 0.5, "pixel": 0.5})
    assert parity_problems(same) == []
    assert same["image_decisions"] == {"positive": 1, "differ": 0, "closest_to_threshold": pytest.approx(0.3)}
    flipped = compare_outputs((maps, scores), (maps + 0.6, np.array([0.6, 0.8])), {"image": 0.5, "pixel": 0.5})
    problems = parity_problems(flipped)
    assert len(problems) == 3 and "1 image decision(s) differ" in problems[1]
    no_thr = compare_outputs((maps, scores), (maps, scores), {})
    assert no_thr["image_decisions"] is None and parity_problems(no_thr) == []

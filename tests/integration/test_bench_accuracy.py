"""``knitwatch bench accuracy``: the extra metrics on hand-made maps, the parser, and the --quick run end
to end on a tiny simulated dataset (real fabric data absent)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from knitwatch.daemon.bench import accuracy as ba
from knitwatch.daemon.cli.common import CliError


def _result(label: str, amap: np.ndarray, mask: np.ndarray | None, valid: np.ndarray | None = None):
    valid = np.ones(amap.shape, bool) if valid is None else valid
    return SimpleNamespace(label=label, path=f"/x/{label}.png", amap=amap, valid=valid, mask=mask)


def test_extra_metrics_cells_and_sizes():
    h, w = 64, 256
    amap = np.zeros((h, w), np.float32)
    mask = np.zeros((h, w), bool)
    mask[10:20, 10:20] = True  # small region (100 px) in cell 0, found: the map peaks there
    amap[10:20, 10:20] = 5.0
    mask[0:40, 130:160] = True  # large region (1200 px) in cell 2, missed: the map is flat there
    amap += np.linspace(0, 1, w, dtype=np.float32)[None]  # normal pixels rise to the right
    valid = np.ones((h, w), bool)
    valid[:, 200:] = False  # most of the last cell is padding: that cell is left out
    bad = _result("hole", amap, mask, valid)
    good = _result("good", np.full((h, w), 9.0, np.float32), None)  # good images do not enter these metrics
    m = ba.extra_metrics([good, bad], cell=64, small_px=500, region_fpr=0.01)
    # cells: 0 (defect, max 5.04), 1 (normal, max 0.50), 2 (defect, max 0.75), 3 (mostly padding: out)
    assert m["cells_positive"] == 2 and m["cells_negative"] == 1
    assert m["cell_auroc_in_defective"] == pytest.approx(1.0)
    assert m["regions_small"] == 1 and m["regions_large"] == 1
    assert m["recall_small"] == 1.0 and m["recall_large"] == 0.0
    assert m["pixel_auroc_in_defective_small"] == pytest.approx(1.0)
    assert m["pixel_auroc_in_defective_large"] < 0.8
    small = next(r for r in m["regions"] if r["size"] == "small")
    assert small["area"] == 100 and small["detected"] and small["peak_percentile"] == 1.0
    json.dumps(ba._jsonable(m))  # JSON-ready


def test_cell_scores_partial_cells():
    amap = np.arange(6 * 10, dtype=np.float32).reshape(6, 10)
    s, d = ba.cell_scores(amap, np.ones_like(amap, bool), np.zeros_like(amap, bool), cell=4)
    assert s.tolist() == [33.0, 37.0, 39.0, 53.0, 57.0, 59.0]  # 2 x 3 cells, the last ones partial
    assert d.tolist() == [0] * 6


def test_parser_and_settings():
    parser = argparse.ArgumentParser()
    bsub = parser.add_subparsers(dest="bench_command")
    ba.register_accuracy(bsub)
    args = parser.parse_args(["accuracy", "--quick", "--models", "patchcore,efficientad-s", "--steps", "7",
                              "--fabrics", "fabric00,fabric05", "--no-sim"])
    assert args.func is ba.cmd_bench_accuracy
    assert args.models == ["patchcore", "efficientad-s"] and args.fabrics == ["fabric00", "fabric05"]
    assert args.sim is False
    s = ba.settings_from_args(args)
    assert s.efficientad_steps == 7 and s.msflow_meta_epochs == ba.QUICK.msflow_meta_epochs
    assert not s.isolate_eval
    full = ba.settings_from_args(parser.parse_args(["accuracy"]))
    assert full == ba.BenchSettings() and full.isolate_eval
    assert any("GPU" in line for line in full.describe())
    with pytest.raises(ValueError, match="unknown model"):
        ba.check_models(["efficientad-x"])
    with pytest.raises(CliError, match="unknown variant.*foo"):
        ba.cmd_bench_accuracy(parser.parse_args(["accuracy", "--variants", "foo", "--out", "/nonexistent"]))


def _quick(tmp_path, models: list[str], extra: tuple[str, ...] | list[str] = ()) -> int:
    from knitwatch.models.efficientad.teacher import random_teacher

    teacher = tmp_path / "teacher.pth"
    torch.save(random_teacher("s", seed=0).state_dict, teacher)  # no distillation: keeps the test short
    return ba.main(["--quick", "--models", ",".join(models), "--teacher", str(teacher), "--out",
                    str(tmp_path / "bench"), "--aitex", str(tmp_path / "absent"), "--fabrics", "fabric00",
                    "--json", str(tmp_path / "r.json"), "--quiet", "--log-level", "WARNING", *extra])


def test_quick_run_patchcore(tmp_path, capsys):
    assert _quick(tmp_path, ["patchcore"]) == 0
    text = capsys.readouterr().out
    assert f"{ba.SIM_NAME:10s} patchcore" in text and "By defect size" in text
    res = json.loads((tmp_path / "r.json").read_text())
    assert list(res["datasets"]) == [ba.SIM_NAME]  # the real fabrics were absent: skipped cleanly
    assert isinstance(res["datasets"][ba.SIM_NAME]["models"]["patchcore"]["metrics"]["pixel_auroc"], float)
    assert res["reused"] == 0
    # an interrupted or repeated run with the same settings reuses the finished result
    assert _quick(tmp_path, ["patchcore"]) == 0
    again = json.loads((tmp_path / "r.json").read_text())
    assert again["reused"] == 1
    assert again["datasets"][ba.SIM_NAME]["models"]["patchcore"]["metrics"] == \
        res["datasets"][ba.SIM_NAME]["models"]["patchcore"]["metrics"]
    # --reevaluate: the same checkpoint evaluated again, not retrained
    assert _quick(tmp_path, ["patchcore"], ["--reevaluate"]) == 0
    third = json.loads((tmp_path / "r.json").read_text())
    assert (third["reused"], third["reevaluated"]) == (0, 1)
    pc = third["datasets"][ba.SIM_NAME]["models"]["patchcore"]
    assert pc["checkpoint"] == res["datasets"][ba.SIM_NAME]["models"]["patchcore"]["checkpoint"]
    assert pc["metrics"]["pixel_auroc"] == res["datasets"][ba.SIM_NAME]["models"]["patchcore"]["metrics"]["pixel_auroc"]
    assert _quick(tmp_path, ["patchcore"]) == 0  # a later plain run reuses it and re-evaluates nothing
    fourth = json.loads((tmp_path / "r.json").read_text())
    assert (fourth["reused"], fourth["reevaluated"]) == (1, 0)


def test_job_key_depends_on_the_models_own_settings_only(tmp_path):
    spec = ba.DatasetSpec("fabric00", tmp_path, 0.5, 256, True)
    s = ba.BenchSettings()
    more_flow = ba.BenchSettings(msflow_meta_epochs=s.msflow_meta_epochs + 1)
    assert ba.job_key(s, spec, "efficientad-s", {}) == ba.job_key(more_flow, spec, "efficientad-s", {})
    assert ba.job_key(s, spec, "patchcore", {}) == ba.job_key(more_flow, spec, "patchcore", {})
    assert ba.job_key(s, spec, "msflow-resnet18", {}) != ba.job_key(more_flow, spec, "msflow-resnet18", {})
    assert ba.job_key(s, spec, "patchcore", {}) != ba.job_key(ba.BenchSettings(seed=1), spec, "patchcore", {})
    other_teacher = {"efficientad-s": (None, {"path": "b.pth"})}
    assert ba.job_key(s, spec, "efficientad-s", {}) != ba.job_key(s, spec, "efficientad-s", other_teacher)


def test_quick_run_end_to_end(tmp_path, capsys):
    out = tmp_path / "bench"
    rc = _quick(tmp_path, ["efficientad-s", "msflow-efficientnet-lite0", "patchcore"], ["--variants", ba.ZERO_PAD])
    assert rc == 0
    text = capsys.readouterr().out
    assert "knitwatch bench accuracy" in text and "GPU" in text
    for m in ("efficientad-s", "msflow-efficientnet-lite0", "patchcore"):
        assert f"{ba.SIM_NAME:10s} {m}" in text
    assert "By defect size" in text
    res = json.loads((tmp_path / "r.json").read_text())
    assert res == json.loads((out / "results.json").read_text())
    assert list(res["datasets"]) == [ba.SIM_NAME]  # the real fabrics were absent: skipped cleanly
    for m in res["models"]:
        met = res["datasets"][ba.SIM_NAME]["models"][m]["metrics"]
        for key in ("image_auroc", "pixel_auroc", "pixel_auroc_in_defective", "tiles_per_s"):
            assert isinstance(met[key], float), (m, key)
    assert len(list((out / "checkpoints").glob(f"{ba.SIM_NAME}-patchcore-*.ckpt"))) == 1
    # the zero-pad row: the same EfficientAD checkpoint with the reference's map padding
    zero = res["datasets"][ba.SIM_NAME]["models"][f"efficientad-s+{ba.ZERO_PAD}"]
    base = res["datasets"][ba.SIM_NAME]["models"]["efficientad-s"]
    assert zero["checkpoint"] == base["checkpoint"] and zero["variant_of"] == "efficientad-s"
    assert zero["metrics"]["pixel_auroc"] != base["metrics"]["pixel_auroc"]
    assert f"efficientad-s+{ba.ZERO_PAD}" in text


def test_zero_pad_variant_needs_the_torch_efficientad():
    from knitwatch.models.efficientad.model import EfficientAD

    model = EfficientAD("s", 64)
    assert model.map_padding == "replicate"
    ba.use_zero_map_padding(model)
    assert model.map_padding == "zeros"
    with pytest.raises(TypeError, match="PyTorch EfficientAD"):
        ba.use_zero_map_padding(SimpleNamespace(predict=None))  # e.g. an ONNX Runtime model


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
def test_memory_of_a_fresh_process_is_its_own():
    """The isolated evaluations report their own peak memory, not their (big) parent's: getrusage's
    ru_maxrss is carried over across fork and exec on Linux, /proc/self/status VmHWM is not."""
    import subprocess
    import sys

    from knitwatch.pipeline.offline.evaluate import process_memory_mb

    ballast = np.ones(160 * 2**20, np.float64)  # 1.25 GiB touched in this process
    assert process_memory_mb("VmHWM") > 1200
    code = ("from knitwatch.pipeline.offline.evaluate import process_memory_mb as m; "
            "print(m('VmHWM'), m('VmRSS'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    peak, now = map(float, out.split())
    assert 0 < now and 0 < peak < 1000, out  # the child imported torch (a few hundred MiB), not 1.25 GiB more
    del ballast

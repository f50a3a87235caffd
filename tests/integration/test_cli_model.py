"""The model workflow through the real `knitwatch` command: synth -> build -> train -> eval/predict."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.helpers.cli import knitwatch


@pytest.fixture(scope="module")
def workflow(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("wf")
    r = knitwatch("dataset", "synth", str(tmp / "syn"), "--normal", "12", "--defective", "4", "--size", "128",
                  "--defects", "hole,oil_stain", "--quiet")
    assert r.returncode == 0, r.stderr
    r = knitwatch("dataset", "build", str(tmp / "syn"), str(tmp / "tiles"), "--tile", "64", "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["counts"]["train/good"] > 0
    r = knitwatch("train", str(tmp / "tiles"), "--out", str(tmp / "m.ckpt"), "--steps", "6", "--distill-steps", "4",
                  "--batch-size", "2", "--checkpoint-every", "3", "--device", "cpu", "--quiet")
    assert r.returncode == 0, r.stderr
    return tmp


def test_train_writes_a_checkpoint_with_the_datasets_preprocessing(workflow: Path) -> None:
    from knitwatch.models.checkpoint import load_checkpoint

    ckpt = load_checkpoint(workflow / "m.ckpt")
    manifest = json.loads((workflow / "tiles" / "manifest.json").read_text())
    assert ckpt.kind == "efficientad-s"
    assert ckpt.preprocess == manifest["preprocess"]
    assert set(ckpt.thresholds) == {"image", "pixel"}
    assert ckpt.provenance["train_tiles"] == sum(1 for t in manifest["tiles"] if t["split"] == "train")
    assert not (workflow / "m.ckpt.resume").exists()  # removed once training finished


def test_eval_reports_the_metrics(workflow: Path) -> None:
    r = knitwatch("eval", str(workflow / "m.ckpt"), str(workflow / "syn"), "--json", "--device", "cpu", "--quiet")
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    n_good = len(list((workflow / "syn" / "test" / "good").glob("*.png")))
    assert n_good >= 1 and m["images"] == n_good + 4 and m["defective_images"] == 4
    for key in ("image_auroc", "pixel_auroc", "au_pro", "pixel_auroc_in_defective", "tile_auroc_in_defective"):
        assert m[key] is not None and 0.0 <= m[key] <= 1.0, key
    assert m["tiles_per_s"] > 0 and m["peak_rss_mb"] > 0


def test_predict_writes_overlays_and_csv(workflow: Path) -> None:
    images = sorted((workflow / "syn" / "test").rglob("*.png"))[:3]
    out = workflow / "pred"
    r = knitwatch("predict", str(workflow / "m.ckpt"), *map(str, images), "--out", str(out), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert [row["image"] for row in rows] == [str(p) for p in images]
    assert all(row["decision"] in ("ok", "defect") and Path(row["overlay"]).is_file() for row in rows)


def test_bad_inputs_exit_2_with_a_clear_message(tmp_path: Path, workflow: Path) -> None:
    r = knitwatch("train", str(tmp_path), "--out", str(tmp_path / "x.ckpt"))
    assert r.returncode == 2 and "manifest" in r.stderr and "knitwatch dataset build" in r.stderr
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    r = knitwatch("eval", str(tmp_path / "junk.ckpt"), str(workflow / "syn"))
    assert r.returncode == 2 and "junk.ckpt" in r.stderr and "Traceback" not in r.stderr
    r = knitwatch("dataset", "build", str(tmp_path / "empty"), str(tmp_path / "o"))
    assert r.returncode == 2 and "empty" in r.stderr
    r = knitwatch("train", str(workflow / "tiles"), "--model", "msflow-resnet18", "--out", str(tmp_path / "r.ckpt"),
                  "--backbone-weights", str(tmp_path / "missing-resnet18.pth"), "--quiet")
    assert r.returncode == 2 and "missing-resnet18.pth" in r.stderr and "Traceback" not in r.stderr

"""Switching a camera's model in the running daemon (no restart), and recording normal fabric through it.

The real daemon (`knitwatch run`) on a simulated camera starts with a checkpoint that flags nothing;
the library holds a second model whose thresholds flag every frame. `Library.use` (what `knitwatch
model use` writes) switches the camera: from a frame boundary on, every decision and event names the
new model and is judged by its thresholds, no frame is lost at the switch (consecutive sequence
numbers but for frames the camera dropped, counted), and no stage restarted. `rollback` switches back.
A recording request (what `knitwatch learn record` writes while the daemon runs) records frames over
whole revolutions and leaves out the frames the running model flags - when that model was learned for
the recorded article.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from knitwatch.models.articles import Library
from knitwatch.models.checkpoint import load_checkpoint
from knitwatch.pipeline.recording import Recording, request_path, write_request
from knitwatch.pipeline.store.database import Store
from tests.helpers.cli import KNITWATCH, clean_env
from tests.helpers.models import untrained_checkpoint
from tests.helpers.net import wait_for
from tests.helpers.procs import read_json_lines

W, H, TILE, REV = 192, 96, 48, 12


def install(lib: Library, article: str, ckpt: Path) -> str:
    c = load_checkpoint(ckpt)
    return lib.add(article, ckpt, {"kind": c.kind, "preprocess": c.preprocess, "thresholds": c.thresholds}).id


def write_config(tmp: Path) -> Path:
    from knitwatch.daemon.cli.common import to_toml

    cfg = {
        "cameras": [{"id": "cam0", "source": "simulator", "fps": 2.0, "width": W, "height": H,
                     "position": {"source": "simulator"},
                     "simulator": {"pitch_px": 6.0, "speed_px": 24.0, "revolution_frames": REV, "seed": 3}}],
        "inference": {"device": "cpu", "max_batch_tiles": 16, "max_wait_ms": 20},
        "alert": {"confirm_k": 1, "confirm_n": 1, "min_area_px": 1},
        "store": {"path": str(tmp / "store")},
        "learn": {"library_dir": str(tmp / "library")},
        "daemon": {"runtime_dir": str(tmp / "run"), "stats_interval_s": 1.0},
        "logging": {"level": "INFO"},
    }
    path = tmp / "knitwatch.toml"
    path.write_text(to_toml(cfg))
    return path


@pytest.mark.timeout(400)
def test_switch_rollback_and_record_in_the_running_daemon(tmp_path: Path) -> None:
    quiet = untrained_checkpoint(tmp_path / "quiet.ckpt", tile=TILE)  # flags nothing
    loud = untrained_checkpoint(tmp_path / "loud.ckpt", tile=TILE, image_threshold=0.0, pixel_threshold=0.0)
    lib = Library(tmp_path / "library")
    loud_id = install(lib, "pique", loud)
    cfg = write_config(tmp_path)
    decisions = tmp_path / "decisions.jsonl"
    log_path = tmp_path / "daemon.log"
    with open(log_path, "w") as logf:
        proc = subprocess.Popen([*KNITWATCH, "--log-format", "json", "run", "--config", str(cfg),
                                 "--checkpoint", str(quiet), "--decisions-log", str(decisions)],
                                stdout=logf, stderr=subprocess.STDOUT, env=clean_env())
    try:
        def rows() -> list[dict]:
            return read_json_lines(decisions)

        # 1. recording through the daemon: quiet model, nothing flagged, 2 whole revolutions
        rec_dir = tmp_path / "rec"
        wait_for(lambda: len(rows()) >= 3, 180, 0.25, what="the first decisions", proc=proc)
        write_request(tmp_path / "library", "cam0", article="jersey", folder=rec_dir, target_frames=5,
                      min_revolutions=2, max_seconds=None)
        wait_for(lambda: not request_path(tmp_path / "library", "cam0").exists(), 120, 0.25,
                 what="the recording to end", proc=proc)
        rec = Recording(rec_dir)
        assert rec.meta["status"] == "done" and rec.meta["how"] == "daemon"
        assert rec.meta["revolutions"] == 2 and rec.meta["skipped_flagged"] == 0
        revs = [f.revolution for f in rec]
        first = revs[0]
        assert {r for r in revs if r != first} == {first + 1, first + 2}  # whole revolutions after the first
        assert sum(1 for r in revs if r == first + 1) == REV and sum(1 for r in revs if r == first + 2) == REV
        assert rec.frames[0].image().shape == (H, W)

        # 2. switch to the loud model: from one frame on, every decision is its and flagged
        n0 = len(rows())
        lib.use("cam0", "pique")
        wait_for(lambda: sum(r.get("model") == loud_id for r in rows()) >= 8, 120, 0.25, what="frames judged by "
                 "the new model", proc=proc)
        after = rows()[n0:]
        models = [r["model"] for r in after]
        k = models.index(loud_id)
        assert all(m != loud_id for m in models[:k]) and all(m == loud_id for m in models[k:]), models
        assert not any(r["defect"] for r in rows() if r["model"] != loud_id)
        assert all(r["defect"] for r in after[k:])
        seqs = [r["seq"] for r in after]
        missing = (seqs[-1] - seqs[0] + 1) - len(seqs)  # frames not decided: only those capture dropped (counted)
        stats = [r for r in read_json_lines(log_path) if r.get("event") == "stats"]
        assert missing <= stats[-1]["cameras"]["cam0"]["dropped"], "a frame was lost at the switch"

        # 3. recording pique with the pique (loud) model leaves out the frames it flags; recording another
        #    article keeps them (a model of another fabric flags the new one as a whole), counted
        def meta(folder: Path) -> dict:
            return json.loads((folder / "meta.json").read_text()) if (folder / "meta.json").exists() else {}

        for article, key, folder in (("pique", "skipped_flagged", tmp_path / "rec2"),
                                     ("jersey-2", "flagged_kept", tmp_path / "rec3")):
            write_request(tmp_path / "library", "cam0", article=article, folder=folder, target_frames=100,
                          min_revolutions=5, max_seconds=None)
            wait_for(lambda f=folder, k=key: meta(f).get(k, 0) >= 3, 60, 0.25, what=f"{key} counted", proc=proc)
            request_path(tmp_path / "library", "cam0").unlink()  # cancel
            wait_for(lambda f=folder: meta(f)["status"] == "cancelled", 30, 0.25, what="the cancel", proc=proc)
        assert meta(tmp_path / "rec2")["frames"] == 0
        assert meta(tmp_path / "rec3")["frames"] >= meta(tmp_path / "rec3")["flagged_kept"] >= 3

        # 4. rollback: back to the checkpoint's model
        n1 = len(rows())
        lib.rollback("cam0")
        wait_for(lambda: sum(r.get("model") != loud_id for r in rows()[n1:]) >= 5, 120, 0.25,
                 what="frames judged by the first model again", proc=proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = read_json_lines(log_path)
    assert not [r for r in log if r.get("event") == "stage failed, restarting"], "a stage restarted"
    assert [r for r in log if r.get("event") == "model loaded beside the others"]
    switched = [r for r in log if r.get("event") == "camera changed model"]
    assert [r["model"] for r in switched] == [loud_id, "untrained"]
    store = Store(tmp_path / "store", retention_days=30, max_gb=1, fsync=False, create=False)
    events = [store.get_event(e["id"]) for e in store.list_events(limit=100)["items"]]
    assert events, "the loud model made no event"
    assert {e["record"]["model"]["id"] for e in events if e} == {loud_id}

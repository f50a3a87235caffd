"""``knitwatch bench detection --workdir DIR``: a folder that does not exist is made; one that cannot be
made or written is a named error with exit 2. On main a missing DIR put the alert stage in a crash
loop (its decisions file could not be opened) and the command ended in a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.cli import knitwatch
from tests.helpers.models import untrained_checkpoint


def test_workdir_that_cannot_be_made_is_a_named_error(tmp_path: Path) -> None:
    ckpt = untrained_checkpoint(tmp_path / "u.ckpt")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    r = knitwatch("bench", "detection", str(ckpt), "--workdir", str(blocker / "sub"), "--device", "cpu", timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "--workdir" in r.stderr and str(blocker / "sub") in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow  # runs the daemon for ~35 s
def test_missing_workdir_is_made(tmp_path: Path) -> None:
    ckpt = untrained_checkpoint(tmp_path / "u.ckpt")
    work = tmp_path / "new" / "bench"
    r = knitwatch("bench", "detection", str(ckpt), "--workdir", str(work), "--device", "cpu", "--frames", "60",
                  "--fps", "3", "--json", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (work / "detection-decisions.jsonl").is_file() and (work / "store").is_dir()
    assert "frames_inspected" in json.loads(r.stdout) and "Traceback" not in r.stderr

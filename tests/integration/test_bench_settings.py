"""The benchmarks load their settings as every command does: a bad ``KNITWATCH_*`` variable or ``--config``
file is a named error with exit code 2 - no traceback, nothing written - not a crash inside ``Settings()``."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.cli import knitwatch


@pytest.mark.parametrize("bench", ["pipeline", "detection", "soak"])
def test_bad_environment_is_a_named_error(tmp_path: Path, bench: str) -> None:
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not read: the settings are checked first")
    work = tmp_path / "work"
    r = knitwatch("bench", bench, str(ckpt), "--workdir", str(work), env={"KNITWATCH_CAMERAS": "x"}, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "KNITWATCH_CAMERAS" in r.stderr and "Traceback" not in r.stderr
    assert not work.exists(), "nothing written before the settings were checked"


@pytest.mark.parametrize("bench", ["pipeline", "detection"])
def test_bad_config_file_is_a_named_error(tmp_path: Path, bench: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[inference]\nmax_batch_tiles = -3\n")
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"x")
    r = knitwatch("--config", str(cfg), "bench", bench, str(ckpt), "--workdir", str(tmp_path / "w"), timeout=120)
    assert r.returncode == 2 and "max_batch_tiles" in r.stderr and "Traceback" not in r.stderr

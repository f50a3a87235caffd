"""The four root folders install as the `knitwatch.*` namespace (regular, non-editable install)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.helpers.paths import ROOT


def test_regular_install_maps_root_folders(tmp_path: Path) -> None:
    target = tmp_path / "site"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert not (target / "models").exists() and not (target / "config").exists()  # no top-level names leak
    code = (
        "import knitwatch.models, knitwatch.pipeline, knitwatch.daemon, knitwatch.config;"
        "import knitwatch.config.settings, knitwatch.pipeline.stages.alert, knitwatch.pipeline.actions;"
        "import pathlib, sys; p = pathlib.Path(knitwatch.config.settings.__file__);"
        "sys.stdout.write(str(p))"
    )
    env = dict(os.environ, PYTHONPATH=str(target))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout).is_relative_to(target)
    example = target / "knitwatch" / "config" / "knitwatch.example.toml"
    assert example.is_file()

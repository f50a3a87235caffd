"""``knitwatch model list|use|rollback`` as a user runs them (real subprocesses) on a model library holding
real checkpoints (added with ``Library.add``): the listing, the selection in active.json, the rollback
history back to the configured checkpoint, and bad input (exit 2, a message naming it, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from knitwatch.models.articles import Library
from tests.helpers.cli import knitwatch
from tests.helpers.library import a_checkpoint, populate_library


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(config file, library folder, configured checkpoint): two cameras, jersey@v1, pique@v1, pique@v2."""
    tmp = tmp_path_factory.mktemp("models-cli")
    ckpt = a_checkpoint(tmp)
    lib = tmp / "lib"
    populate_library(lib, ckpt, [("jersey", 0.0, 0.95), ("pique", 2.5, 0.8), ("pique", 0.25, 0.9)])
    cfg = tmp / "knitwatch.toml"
    cfg.write_text(f'[[cameras]]\nid = "cam0"\n[[cameras]]\nid = "cam1"\n[store]\npath = "{tmp / "store"}"\n'
                   f'[model]\ncheckpoint = "{ckpt}"\n[learn]\nlibrary_dir = "{lib}"\n', encoding="utf-8")
    return cfg, lib, ckpt


def run(cfg: Path, *args: str) -> tuple[int, str, str]:
    r = knitwatch("--config", str(cfg), "model", *args, timeout=120)
    return r.returncode, r.stdout, r.stderr


def test_list_use_rollback(setup: tuple[Path, Path, Path]) -> None:
    cfg, lib, ckpt = setup
    (lib / "active.json").unlink(missing_ok=True)
    rc, out, err = run(cfg, "list")
    assert rc == 0, err
    assert "cam0" in out and f"configured checkpoint ({ckpt.name})" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if "@v" in line}
    assert set(rows) == {"jersey@v1", "pique@v1", "pique@v2"}
    assert rows["pique@v1"][3:5] == ["2.50", "0.800"]  # false stops per hour, recall
    assert rows["pique@v2"][-1] == "-"  # used by nobody yet

    rc, out, err = run(cfg, "use", "pique", "--camera", "cam0")  # the newest version
    assert rc == 0, err
    assert "cam0 now uses pique@v2" in out and "switches to it by itself" in out
    assert Library(lib).selection()["cameras"]["cam0"]["model"]["id"] == "pique@v2"
    rc, out, err = run(cfg, "use", "jersey@1", "--camera", "cam0")
    assert rc == 0, err
    rc, out, err = run(cfg, "use", "pique@v1", "--camera", "cam1")
    assert rc == 0, err

    rc, out, err = run(cfg, "list", "--json")
    assert rc == 0, err
    info = json.loads(out)
    assert info["cameras"]["cam0"]["model"] == "jersey@v1" and info["cameras"]["cam0"]["history"] == ["pique@v2"]
    assert info["cameras"]["cam1"]["model"] == "pique@v1" and not info["cameras"]["cam1"]["configured"]
    used = {v["id"]: v["used_by"] for a in info["articles"] for v in a["versions"]}
    assert used == {"jersey@v1": ["cam0"], "pique@v1": ["cam1"], "pique@v2": []}
    figures = {v["id"]: (v["false_stops_per_hour"], v["recall"]) for a in info["articles"] for v in a["versions"]}
    assert figures["jersey@v1"] == (0.0, 0.95)

    rc, out, err = run(cfg, "rollback", "--camera", "cam0")
    assert rc == 0, err
    assert "cam0 rolls back to pique@v2" in out
    rc, out, err = run(cfg, "rollback", "--camera", "cam0")
    assert rc == 0, err
    assert f"the configured checkpoint ({ckpt.name})" in out
    assert "cam0" not in Library(lib).selection()["cameras"]
    rc, out, err = run(cfg, "rollback", "--camera", "cam0")
    assert rc == 2 and "no earlier model" in err
    assert Library(lib).selection()["cameras"]["cam1"]["model"]["id"] == "pique@v1"  # the other camera kept its


@pytest.mark.parametrize(("args", "message"), [
    (["use", "pique", "--camera", "cam9"], "--camera 'cam9': no such camera in the configuration (cameras: cam0, cam1"),
    (["rollback", "--camera", "cam9"], "(cameras: cam0, cam1)"),
    (["use", "../pique", "--camera", "cam0"], "article name '../pique' is not allowed"),
    (["use", "pique@7", "--camera", "cam0"], "article 'pique' has no version 7 (versions: 1, 2)"),
    (["use", "pique@x", "--camera", "cam0"], "the version after '@' must be a number"),
    (["use", "satin", "--camera", "cam0"], "no model for article 'satin'"),
])
def test_bad_input_exit_2_and_nothing_written(setup: tuple[Path, Path, Path], args: list[str], message: str) -> None:
    cfg, lib, _ckpt = setup
    before = (lib / "active.json").read_bytes() if (lib / "active.json").exists() else None
    rc, out, err = run(cfg, *args)
    assert rc == 2, (out, err)
    assert message in err and "Traceback" not in err
    after = (lib / "active.json").read_bytes() if (lib / "active.json").exists() else None
    assert after == before


def test_empty_library_and_help(tmp_path: Path) -> None:
    cfg = tmp_path / "k.toml"
    cfg.write_text(f'[store]\npath = "{tmp_path / "store"}"\n', encoding="utf-8")
    rc, out, err = run(cfg, "list")
    assert rc == 0, err
    assert "no models in the library yet" in out and str(tmp_path / "store" / "models") in out
    assert not (tmp_path / "store").exists()  # listing writes nothing
    r = knitwatch("model", "use", "--help", timeout=60)
    assert r.returncode == 0 and "ARTICLE[@VERSION]" in r.stdout and "rollback" in r.stdout

"""The model library: versions appear whole or not at all, names cannot leave the library, the selection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from knitwatch.models.articles import Library, LibraryError, check_article, parse_spec

META = {"kind": "efficientad-s", "preprocess": {"tile": 48}, "thresholds": {"image": 1.0, "pixel": 0.5}}


def ckpt(tmp_path: Path, data: bytes = b"weights") -> Path:
    p = tmp_path / "src.ckpt"
    p.write_bytes(data)
    return p


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".hidden", "", "a" * 65, "x\x00", "pique jersey", "é"])
def test_article_names_with_path_characters_are_refused(name: str) -> None:
    with pytest.raises(LibraryError, match="not allowed"):
        check_article(name)


def test_versions_count_up_and_get_finds_them(tmp_path: Path) -> None:
    lib = Library(tmp_path / "lib")
    assert lib.articles() == []
    v1 = lib.add("pique-2", ckpt(tmp_path, b"one"), META)
    v2 = lib.add("pique-2", ckpt(tmp_path, b"two"), {**META, "validation": {"false_stops_per_hour": 0.0}})
    assert (v1.version, v2.version) == (1, 2) and v2.id == "pique-2@v2"
    assert lib.articles() == ["pique-2"]
    assert lib.get("pique-2").version == 2 and lib.get("pique-2@1").checkpoint.read_bytes() == b"one"
    assert lib.get("pique-2@v2").meta["validation"] == {"false_stops_per_hour": 0.0}
    assert "created" in v1.meta
    with pytest.raises(LibraryError, match="no version 3 .*versions: 1, 2"):
        lib.get("pique-2@3")
    with pytest.raises(LibraryError, match="no model for article 'jersey'.*articles: pique-2"):
        lib.get("jersey")
    with pytest.raises(LibraryError, match="must be a number"):
        parse_spec("pique@x")


def test_a_failed_add_leaves_nothing_half_written(tmp_path: Path) -> None:
    lib = Library(tmp_path / "lib")
    with pytest.raises(FileNotFoundError):
        lib.add("pique", tmp_path / "missing.ckpt", META)
    with pytest.raises(LibraryError, match="lacks thresholds"):
        lib.add("pique", ckpt(tmp_path), {"kind": "x", "preprocess": {}})
    assert lib.articles() == []
    assert [p.name for p in (tmp_path / "lib").iterdir()] == []  # no article folder, no temporary left


def test_use_and_rollback_keep_a_history_per_camera(tmp_path: Path) -> None:
    lib = Library(tmp_path / "lib")
    lib.add("jersey", ckpt(tmp_path), META)
    lib.add("pique", ckpt(tmp_path), META)
    lib.add("pique", ckpt(tmp_path), META)
    with pytest.raises(LibraryError, match="configured checkpoint"):
        lib.rollback("cam0")
    lib.use("cam0", "jersey")
    lib.use("cam0", "pique@1")
    lib.use("cam0", "pique")
    lib.use("cam1", "pique@1")
    sel = json.loads(lib.selection_path.read_text())
    assert sel["cameras"]["cam0"]["model"]["id"] == "pique@v2"
    assert [m["id"] for m in sel["cameras"]["cam0"]["history"]] == ["jersey@v1", "pique@v1"]
    assert sel["cameras"]["cam0"]["model"]["thresholds"] == META["thresholds"]
    assert lib.rollback("cam0")["id"] == "pique@v1"
    assert lib.rollback("cam0")["id"] == "jersey@v1"
    assert lib.rollback("cam0") == {}  # back to the daemon's configured checkpoint
    assert "cam0" not in lib.selection()["cameras"]
    assert lib.selection()["cameras"]["cam1"]["model"]["id"] == "pique@v1"


def test_a_broken_selection_file_is_named(tmp_path: Path) -> None:
    lib = Library(tmp_path)
    lib.selection_path.write_text("{not json")
    with pytest.raises(LibraryError, match="active.json is not valid JSON"):
        lib.selection()

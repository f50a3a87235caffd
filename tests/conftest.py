from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
AITEX = SHARED_DATA / "aitex-dev"


@pytest.fixture(autouse=True)
def _clean_knitwatch_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests start without the caller's KNITWATCH_* variables (they would change the settings)."""
    for name in list(os.environ):
        if name.upper().startswith("KNITWATCH_"):
            monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def _private_cache(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """On-the-fly ONNX exports (the default ``auto`` backend on a CPU) go to this run's temporary
    folder, shared by the tests of the run, never to the user's ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.delenv("CACHE_DIRECTORY", raising=False)


def needs_aitex(fabric: str = "") -> pytest.MarkDecorator:
    path = AITEX / fabric if fabric else AITEX
    return pytest.mark.skipif(not path.is_dir(), reason=f"real fabric data not present at {path}")


@pytest.fixture(autouse=True)
def _fresh_logging() -> None:
    """A test that ran the CLI in-process configured structlog with pytest's captured stderr, which
    is closed after that test: give every test the default configuration back."""
    import logging

    import structlog

    yield
    structlog.reset_defaults()
    logging.getLogger().handlers[:] = []

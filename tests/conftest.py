from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from knitwatch.pipeline.actions.simplc import SimulatedPlc

if TYPE_CHECKING:
    from knitwatch.config import Settings


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


@pytest.fixture(autouse=True)
def _fresh_logging() -> None:
    """A test that ran the CLI in-process configured structlog with pytest's captured stderr, which
    is closed after that test: give every test the default configuration back."""
    import logging

    import structlog

    yield
    structlog.reset_defaults()
    logging.getLogger().handlers[:] = []


@pytest.fixture
def plc() -> Iterator[SimulatedPlc]:
    """The simulated PLC (a real pymodbus server on a free loopback port), stopped after the test."""
    p = SimulatedPlc().start()
    yield p
    p.stop()


@pytest.fixture
def populated(tmp_path: Path) -> tuple[Settings, list[int]]:
    """Settings for cameras cam0 and cam1 with a store under ``tmp_path`` holding the events of
    :data:`tests.helpers.api.EVENTS` (with their pictures); their ids, oldest first."""
    from tests.helpers.api import make_settings, populate_store

    settings = make_settings(tmp_path)
    return settings, populate_store(settings.store.path)

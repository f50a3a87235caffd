"""Where things are, for every test: the repository, the example config, the real fabric data."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
"""The repository (the folder of pyproject.toml)."""
EXAMPLE_CONFIG = ROOT / "config" / "knitwatch.example.toml"
SHARED_DATA = ROOT.parent / "shared" / "data"
AITEX = SHARED_DATA / "aitex-dev"
"""The AITEX fabric images (not in the repository; tests that need them skip without them)."""


def needs_aitex(fabric: str = "") -> pytest.MarkDecorator:
    """Skip unless the AITEX data (or its folder ``fabric``, e.g. ``fabric01``) is present."""
    path = AITEX / fabric if fabric else AITEX
    return pytest.mark.skipif(not path.is_dir(), reason=f"real fabric data not present at {path}")

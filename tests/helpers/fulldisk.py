"""A really full disk: a tiny tmpfs mounted for a test (root only; skipped, saying so, elsewhere)."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def tiny_disk(path: Path, size_kb: int = 64) -> Iterator[Path]:
    """Mount a ``size_kb`` tmpfs on ``path`` (created) for the duration; writes beyond it fail with ENOSPC."""
    path.mkdir(parents=True, exist_ok=True)
    got = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)],
                         capture_output=True, text=True, check=False)
    if got.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {got.stderr.strip()[:200]}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)

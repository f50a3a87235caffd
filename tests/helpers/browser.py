"""A headless Chromium driven by selenium, for the web-page tests; skips with the reason when Chromium,
its driver or selenium is missing (tests/e2e/test_browser.py installs them when it can)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def start_chrome(profile: Path, size: str = "1280,1000") -> Any:  # noqa: ANN401 - a selenium WebDriver
    """A headless Chromium with its profile in ``profile``, or ``pytest.skip`` with the reason."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[dev]')")
    browser = next((shutil.which(n) for n in CHROMIUM_NAMES if shutil.which(n)), None)
    driver = shutil.which("chromedriver")
    if not (browser and driver):
        pytest.skip("headless Chromium not installed: apt-get install -y chromium chromium-driver")
    os.environ.setdefault("SE_AVOID_STATS", "true")
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-extensions", f"--window-size={size}", f"--user-data-dir={profile}"):
        opts.add_argument(arg)
    try:
        drv = webdriver.Chrome(options=opts, service=Service(executable_path=driver))
    except Exception as e:  # noqa: BLE001 - a browser that cannot start is a skip with its reason
        pytest.skip(f"headless Chromium did not start: {str(e).splitlines()[0]}")
    drv.set_page_load_timeout(30)
    return drv


def wait_until(pred: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:  # noqa: ANN401
    """``pred()``'s first true value within ``timeout`` s (an exception counts as not yet)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            v = pred()
            if v:
                return v
        except Exception:  # noqa: BLE001 - element not there yet
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)

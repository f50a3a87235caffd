"""A headless Chromium driven by selenium, for the web-page tests. When Chromium or its driver is missing,
it is installed (``apt-get install -y chromium chromium-driver``, as root), else the test skips with the
reason; so does a missing selenium."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def _find_browser() -> tuple[str | None, str | None]:
    browser = next((shutil.which(n) for n in CHROMIUM_NAMES if shutil.which(n)), None)
    return browser, shutil.which("chromedriver")


def _ensure_chromium() -> tuple[str, str]:
    browser, driver = _find_browser()
    if browser and driver:
        return browser, driver
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("headless Chromium not installed and cannot install it here (needs root and apt-get): "
                    "apt-get install -y chromium chromium-driver")
    try:
        r = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium", "chromium-driver"],
                           capture_output=True, text=True, timeout=600, env={**os.environ,
                                                                             "DEBIAN_FRONTEND": "noninteractive"})
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot install chromium: {e}")
    browser, driver = _find_browser()
    if not (browser and driver):
        pytest.skip(f"apt-get install chromium chromium-driver failed (exit {r.returncode}): {r.stderr[-400:]}")
    return browser, driver


def start_chrome(profile: Path, size: str = "1280,1000") -> Any:  # noqa: ANN401 - a selenium WebDriver
    """A headless Chromium with its profile in ``profile``, or ``pytest.skip`` with the reason."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[dev]')")
    browser, driver = _ensure_chromium()
    os.environ.setdefault("SE_AVOID_STATS", "true")
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                "--disable-default-apps", "--disable-extensions", "--hide-scrollbars", "--force-device-scale-factor=1",
                f"--window-size={size}", f"--user-data-dir={profile}"):
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

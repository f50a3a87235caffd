"""The web page's rolls view in a real headless Chromium (selenium), against the real API on a real
uvicorn server and a real store holding a roll whose grade is known: the current roll's counts and
grade, the list of rolls, a roll's report with its pictures, and a new roll started from the page.
Skipped with the reason when Chromium or selenium is missing (tests/e2e/test_browser.py installs them)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from knitwatch.config import Settings
from knitwatch.config.settings import ApiConfig, CameraConfig, StoreConfig
from knitwatch.daemon.api.app import ApiServer, create_app
from knitwatch.daemon.api.deps import StaticView
from knitwatch.pipeline.store.database import Store
from tests.helpers.browser import start_chrome, wait_until
from tests.helpers.rolls import ROLL_CFG, fill


@pytest.fixture
def chrome(tmp_path: Path) -> Iterator[Any]:
    drv = start_chrome(tmp_path / "profile")
    yield drv
    drv.quit()


def test_rolls_view_in_headless_chromium(chrome: Any, tmp_path: Path) -> None:  # noqa: ANN401
    from selenium.webdriver.common.by import By

    root = tmp_path / "store"
    rid, ids = fill(root)
    settings = Settings(cameras=[CameraConfig(id="c")], store=StoreConfig(path=root, fsync=False), api=ApiConfig(),
                        roll=ROLL_CFG)
    server = ApiServer(create_app(settings, StaticView({}, healthy=True)), "127.0.0.1", 0).start()
    store = Store(root, retention_days=3650, max_gb=1, fsync=False)
    try:
        chrome.get(server.url + "/")
        # the current roll: 3 defects, 5 points on 90 m², grade A
        grade = wait_until(lambda: chrome.find_element(By.ID, "roll-grade"), 20, "the current roll's grade")
        assert grade.text == "A" and "g-A" in grade.get_attribute("class")
        counts = chrome.find_element(By.ID, "roll-counts").text
        assert "3 defect(s)" in counts and "hole 1" in counts and "points 5" in counts and "5.6 per 100 m²" in counts
        # the list of rolls and the roll's report with its pictures
        chrome.find_element(By.CSS_SELECTOR, "#rolls details summary").click()
        link = wait_until(lambda: chrome.find_element(By.CSS_SELECTOR, f'#roll-list tr[data-roll-id="{rid}"] a'), 10,
                          "the roll in the list")
        link.click()
        rows = wait_until(lambda: (r := chrome.find_elements(By.CSS_SELECTOR, "#report-defects tbody tr")) and r, 10,
                          "the report's defects")
        assert [int(r.get_attribute("data-event-id")) for r in rows] == ids
        assert [r.find_elements(By.TAG_NAME, "td")[8].text for r in rows] == ["1", "2", "4"]
        summary = chrome.find_element(By.ID, "report-summary").text
        assert "points 5 (7 before the 4-per-yard cap)" in summary and "4.7 per 100 yd²" in summary
        loaded = "return [...document.querySelectorAll('#report-defects img')].every(i => i.complete && i.naturalWidth)"
        wait_until(lambda: chrome.execute_script(loaded), 10, "the report's pictures")
        chrome.find_element(By.CSS_SELECTOR, "#roll-view [data-close]").click()
        wait_until(lambda: not chrome.find_element(By.ID, "roll-view").is_displayed(), 5, "the report to close")
        # a new roll from the page (its prompt takes the note)
        chrome.find_element(By.ID, "roll-new").click()
        prompt = wait_until(lambda: chrome.switch_to.alert, 5, "the prompt")
        prompt.send_keys("article 45")
        prompt.accept()
        new = wait_until(lambda: (r := store.current_roll()) and r["id"] != rid and r, 10, "the new roll in the store")
        assert new["reason"] == "api" and new["note"] == "article 45" and new["by"] == "web page"
        wait_until(lambda: chrome.find_element(By.CSS_SELECTOR, "#roll-current h2").text == f"Roll {new['id']}", 15,
                   "the page to show the new roll")
        assert "0 defect(s)" in chrome.find_element(By.ID, "roll-counts").text
    finally:
        store.close()
        server.stop()

"""The web page's models view in a real headless Chromium (selenium), against the real API on a real uvicorn
server and a real model library: the camera's model, "Use this model", "Roll back", and "Learn this fabric"
with its progress through a learn job that runs a real program standing in for ``knitwatch learn`` (see
tests/helpers/library.py). Skips with the reason when Chromium cannot be had (tests/helpers/browser.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from knitwatch.config import Settings
from knitwatch.config.settings import CameraConfig, LearnConfig, ModelConfig, StoreConfig
from knitwatch.daemon.api.app import ApiServer, create_app
from knitwatch.daemon.api.deps import StaticView
from knitwatch.daemon.api.learnjobs import LearnJobs
from knitwatch.models.articles import Library
from tests.helpers.api import SNAPSHOT
from tests.helpers.browser import start_chrome, wait_until
from tests.helpers.library import a_checkpoint, fake_learn_command, populate_library


@pytest.fixture
def chrome(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    drv = start_chrome(tmp_path_factory.mktemp("chromium-profile"))
    yield drv
    drv.quit()


def test_models_view_use_rollback_and_learn(chrome: Any, tmp_path: Path) -> None:  # noqa: ANN401
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    ckpt = a_checkpoint(tmp_path)
    lib_dir = tmp_path / "lib"
    populate_library(lib_dir, ckpt, [("jersey", 0.0, 0.95), ("pique", 0.25, 0.9)])
    settings = Settings(cameras=[CameraConfig(id="cam0"), CameraConfig(id="cam1")],
                        store=StoreConfig(path=tmp_path / "store"), model=ModelConfig(checkpoint=ckpt),
                        learn=LearnConfig(library_dir=lib_dir))
    app = create_app(settings, StaticView(SNAPSHOT, healthy=True))
    app.state.learn = LearnJobs(lib_dir, settings, command=fake_learn_command(tmp_path, ckpt), poll_s=0.05)
    server = ApiServer(app, "127.0.0.1", 0).start()
    lib = Library(lib_dir)
    try:
        chrome.get(server.url + "/")

        def card(cam: str) -> Any:  # noqa: ANN401
            return chrome.find_element(By.CSS_SELECTOR, f'.model-cam[data-model-camera="{cam}"]')

        def in_use(cam: str) -> str:
            return card(cam).find_element(By.CSS_SELECTOR, ".model-in-use").text

        wait_until(lambda: in_use("cam0") == f"the configured checkpoint ({ckpt.name})", 20, "cam0's model")
        rows = wait_until(lambda: chrome.find_elements(By.CSS_SELECTOR, "#models-library tr[data-model]"), 10,
                          "the library")
        assert [r.get_attribute("data-model") for r in rows] == ["jersey@v1", "pique@v1"]
        assert "0.25" in rows[1].text and "0.900" in rows[1].text  # false stops per hour, recall
        assert not card("cam0").find_element(By.CSS_SELECTOR, ".model-rollback").is_enabled()

        # "Use this model": cam1 switches to pique@v1 (the selection file), cam0 keeps its model
        Select(chrome.find_element(By.ID, "models-camera")).select_by_value("cam1")
        chrome.find_element(By.CSS_SELECTOR, '#models-library tr[data-model="pique@v1"] .model-use').click()
        wait_until(lambda: lib.selection()["cameras"].get("cam1", {}).get("model", {}).get("id") == "pique@v1", 10,
                   "the selection")
        wait_until(lambda: in_use("cam1") == "pique@v1", 10, "the page to show cam1's new model")
        assert "cam0" not in lib.selection()["cameras"]
        wait_until(lambda: "cam1" in chrome.find_element(
            By.CSS_SELECTOR, '#models-library tr[data-model="pique@v1"]').text, 10, "used by cam1")

        # "Roll back": back to the configured checkpoint
        card("cam1").find_element(By.CSS_SELECTOR, ".model-rollback").click()
        wait_until(lambda: "cam1" not in lib.selection()["cameras"], 10, "the rollback")
        wait_until(lambda: in_use("cam1").startswith("the configured checkpoint"), 10, "the page to show it")

        # "Learn this fabric" on cam0: progress, then the new version installed and in use
        form = card("cam0").find_element(By.CSS_SELECTOR, ".learn-form")
        form.find_element(By.NAME, "article").send_keys("pique")
        amount = form.find_element(By.NAME, "amount")
        amount.clear()
        amount.send_keys("8")
        form.find_element(By.CSS_SELECTOR, ".learn-start").click()
        progress = card("cam0").find_element(By.CSS_SELECTOR, ".learn-progress")
        wait_until(lambda: progress.get_attribute("data-state") in ("recording", "training", "validating"), 10,
                   "the job to start")
        wait_until(lambda: progress.get_attribute("data-state") == "done", 60, "the job to end")
        assert "pique@v2 installed" in progress.text
        assert lib.selection()["cameras"]["cam0"]["model"]["id"] == "pique@v2"
        wait_until(lambda: in_use("cam0") == "pique@v2", 10, "cam0's new model on the page")
        wait_until(lambda: len(chrome.find_elements(By.CSS_SELECTOR, "#models-library tr[data-model]")) == 3, 10,
                   "the new version in the library table")
        # no script error, no failed request of this view (the other views find no store here: their 503s)
        logs = [e for e in chrome.get_log("browser") if e["level"] == "SEVERE"
                and (e.get("source") != "network" or "/api/models" in e["message"] or "/api/learn" in e["message"])]
        assert not logs, logs
        chrome.execute_script("document.getElementById('models').scrollIntoView()")
        chrome.save_screenshot(str(tmp_path / "models.png"))
        print(f"screenshot: {tmp_path / 'models.png'}")
    finally:
        server.stop()

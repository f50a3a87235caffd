"""The web page in a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium).

Against real parts: the API on a real uvicorn server, a real store holding events with pictures, the
action runner (as the alert stage runs it) driving a real pymodbus PLC whose stop coil is latched. The
page must show the cameras and the gallery, open an event with its frame/overlay/mask, keep it, and the
acknowledge button must reset the latch - in the store and on the PLC. Screenshots are written to the
test's temporary folder (path printed); with ``UPDATE_DOCS_SCREENSHOTS=1`` also to ``docs/``.

When Chromium or its driver is missing, the setup installs them (``apt-get install -y chromium
chromium-driver``, as root) and otherwise skips with the reason.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import pytest

from knitwatch.config import Settings
from knitwatch.config.settings import PlcConfig, StoreConfig
from knitwatch.daemon.api.app import ApiServer, create_app
from knitwatch.daemon.api.deps import StaticView
from knitwatch.pipeline.actions import ActionRunner
from knitwatch.pipeline.actions.modbus import ModbusDriver
from knitwatch.pipeline.actions.simplc import SimulatedPlc
from knitwatch.pipeline.store.database import Store
from tests.helpers.api import SNAPSHOT
from tests.helpers.browser import start_chrome, wait_until
from tests.helpers.paths import ROOT


@pytest.fixture(scope="module")
def chrome(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    drv = start_chrome(tmp_path_factory.mktemp("chromium-profile"))
    yield drv
    drv.quit()


def save_shot(drv, path: Path, max_kb: int = 300) -> Path:  # noqa: ANN001
    """A PNG screenshot under ``max_kb`` (for the README): 256 colours (Pillow, when installed), then
    shrunk while still too big."""
    raw = path.with_suffix(".raw.png")
    drv.save_screenshot(str(raw))
    scale = 1.0
    while True:
        try:
            from PIL import Image

            with Image.open(raw) as im:
                im = im.convert("RGB")
                if scale != 1.0:
                    im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.LANCZOS)
                im.quantize(256, dither=Image.Dither.NONE).save(path, optimize=True)
        except ImportError:
            img = cv2.imread(str(raw))
            if scale != 1.0:
                img = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
            assert cv2.imwrite(str(path), img, [cv2.IMWRITE_PNG_COMPRESSION, 9])
        if path.stat().st_size <= max_kb * 1024 or scale < 0.4:
            break
        scale *= 0.9
    raw.unlink()
    return path


def test_gallery_page_in_headless_chromium(chrome, plc: SimulatedPlc, populated: tuple[Settings, list[int]],  # noqa: ANN001
                                           tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    settings, ids = populated
    store = Store.from_config(StoreConfig(path=settings.store.path, fsync=False), create=False)
    cfg = PlcConfig(driver="modbus", port=plc.port, stop_address=0, alarm_address=2, heartbeat_address=1,
                    heartbeat_idle_s=0)
    runner = ActionRunner(ModbusDriver(cfg), cfg, store=store, ack_poll_s=0.1).start()
    server = ApiServer(create_app(settings, StaticView(SNAPSHOT, healthy=True)), "127.0.0.1", 0).start()
    shots = tmp_path / "screenshots"
    shots.mkdir()
    try:
        wait_until(lambda: plc.coil(0), 10, "the latched stop on the PLC")
        chrome.get(server.url + "/")
        # the gallery shows every stored event, newest first
        cards = wait_until(lambda: (c := chrome.find_elements(By.CSS_SELECTOR, "#gallery .card")) and len(c) == len(ids)
                           and c, 20, "the gallery")
        assert [int(c.get_attribute("data-event-id")) for c in cards] == ids[::-1]
        wait_until(lambda: all(chrome.execute_script(
            "return [...document.querySelectorAll('#gallery img.thumb')].every(i => i.complete && i.naturalWidth > 0)")
            for _ in [0]), 15, "the thumbnails")
        # cameras and the latched alarm
        banner = chrome.find_element(By.ID, "alarm")
        assert banner.is_displayed() and "Machine stopped" in banner.text
        cams = {c.get_attribute("data-camera"): c for c in chrome.find_elements(By.CSS_SELECTOR, "#cameras .cam")}
        assert set(cams) == {"cam0", "cam1"}
        assert "STOPPED" in cams["cam0"].text.upper() and "2.0" in cams["cam0"].text
        assert "94" in cams["cam1"].text  # coverage 94 %
        assert chrome.find_element(By.ID, "health").get_attribute("data-state") == "healthy"
        wait_until(lambda: chrome.execute_script(
            "return [...document.querySelectorAll('.cam-last img')].every(i => i.complete && i.naturalWidth > 0)"),
            10, "last-defect thumbnails")
        save_shot(chrome, shots / "gallery.png")

        # event view: overlay, frame, mask; keep
        cards[0].click()
        dialog = wait_until(lambda: (d := chrome.find_element(By.ID, "event-view")) and d.is_displayed() and d, 10,
                            "the event view")
        assert f"#{ids[-1]}" in chrome.find_element(By.ID, "ev-title").text

        def shown(kind: str) -> bool:
            src = chrome.find_element(By.ID, "ev-img").get_attribute("src")
            return src.endswith(f"/{kind}") and chrome.execute_script(
                "const i = document.getElementById('ev-img'); return i.complete && i.naturalWidth > 0")

        wait_until(lambda: shown("overlay"), 10, "the overlay")
        assert chrome.execute_script("return document.getElementById('ev-img').naturalWidth") == 512
        save_shot(chrome, shots / "event.png")
        for kind in ("frame", "mask"):
            dialog.find_element(By.CSS_SELECTOR, f'.tabs button[data-kind="{kind}"]').click()
            wait_until(lambda k=kind: shown(k), 10, kind)
        chrome.find_element(By.ID, "ev-keep").click()
        wait_until(lambda: store.get_event(ids[-1])["keep"], 10, "keep in the store")
        assert "✓" in chrome.find_element(By.ID, "ev-keep").text
        dialog.find_element(By.CSS_SELECTOR, "[data-close]").click()
        wait_until(lambda: not chrome.find_element(By.ID, "event-view").is_displayed(), 5, "the view to close")

        # acknowledge: the latch resets in the store and on the PLC, and the page shows it
        assert store.latched()["stop"] == ["cam0", "cam1"]
        chrome.find_element(By.ID, "ack-btn").click()
        wait_until(lambda: store.latched() == {"stop": [], "alarm": []}, 10, "the latch reset in the store")
        wait_until(lambda: not plc.coil(0), 10, "the PLC's stop coil cleared")
        wait_until(lambda: not chrome.find_element(By.ID, "alarm").is_displayed(), 10, "the banner to go")
        wait_until(lambda: "STOPPED" not in chrome.find_element(By.CSS_SELECTOR, '[data-camera="cam0"]').text.upper(),
                   10, "the camera card to clear")
        ack = store.list_acks()[0]
        assert ack["by"] == "web page" and ack["cleared_ns"] is not None
        wait_until(lambda: not chrome.find_elements(By.CSS_SELECTOR, "#gallery .card.latched"), 10,
                   "latched marks gone from the gallery")
        # a filter: only cam1's events
        from selenium.webdriver.support.ui import Select

        Select(chrome.find_element(By.ID, "f-camera")).select_by_value("cam1")
        wait_until(lambda: len(chrome.find_elements(By.CSS_SELECTOR, "#gallery .card")) == 3, 10, "the camera filter")
        logs = [e for e in chrome.get_log("browser") if e["level"] == "SEVERE"]
        assert not logs, logs
    finally:
        server.stop()
        runner.stop()
        store.close()
    print(f"screenshots: {shots}")
    for p in shots.iterdir():
        assert p.stat().st_size < 300 * 1024
    if os.environ.get("UPDATE_DOCS_SCREENSHOTS") == "1":
        shutil.copy(shots / "gallery.png", ROOT / "docs" / "gallery.png")
        shutil.copy(shots / "event.png", ROOT / "docs" / "gallery-event.png")

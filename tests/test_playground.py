"""The playground (``GET /``) in a real headless browser: Debian's chromium driven by Selenium.

Nothing is downloaded: chromedriver is the one at /usr/bin (``.ci/run`` installs Debian's ``chromium``
and ``chromium-driver``); the test skips, saying so, where they are missing. A screenshot of the page
after a generation is saved under the test's tmp dir (a CI artifact).
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx2
import numpy as np
import pytest
from deft_client import DeftClient
from PIL import Image

from deft_runtime.adapter import AdapterKind
from deft_runtime.base_view import BaseView
from deft_runtime.formats import save_adapter
from deft_runtime.models import build_tiny_sdxl
from deft_runtime.testing import random_adapter

webdriver = pytest.importorskip("selenium.webdriver", reason="the playground test needs selenium (deft[dev])")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM = Path("/usr/bin/chromium")
TOKEN = "playground-key"
STEPS = 6
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def browser():
    if not (CHROMEDRIVER.exists() and CHROMIUM.exists()):
        pytest.skip("no Debian chromium: apt-get install chromium chromium-driver (.ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(flag)
    # an explicit driver path: selenium-manager never runs (it would try to download one)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_script_timeout(TIMEOUT_S)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(server_factory, tmp_path_factory):
    server = server_factory.start("--token", TOKEN)
    shapes = BaseView(build_tiny_sdxl(0).unet).layer_shapes
    adapter = random_adapter(AdapterKind.DEFT, shapes, rank=2, seed=9, magnitude=1.0)
    path = save_adapter(adapter, tmp_path_factory.mktemp("playground") / "ink.deft.safetensors")
    with DeftClient(server.address, token=TOKEN, timeout=120) as client:
        client.register_adapter("ink", path)
    return server


def _png(data_url: str) -> np.ndarray:
    assert data_url.startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))) as image:
        return np.asarray(image.convert("RGB"))


def test_generate_with_an_adapter_shows_previews_then_the_image(browser, server, tmp_path):
    wait = WebDriverWait(browser, TIMEOUT_S)
    browser.get(server.http_url + "/")
    browser.execute_script("localStorage.clear()")
    key = browser.find_element(By.ID, "api-key")
    key.send_keys(TOKEN)
    browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", key)
    adapter = wait.until(lambda d: d.find_element(By.ID, "adapter-ink"))  # listed from /v1/models
    assert browser.find_element(By.ID, "model-name").text == "tiny-sdxl"
    assert browser.execute_script("return localStorage.getItem('deft.apiKey')") == TOKEN
    shown_load = int(browser.find_element(By.ID, "adapter-list").get_attribute("data-loaded"))
    browser.find_element(By.ID, "prompt").click()  # leaving the key field: the page reloads the list
    # the reload replaces the rows: wait for the new list, not a row of the old one
    wait.until(lambda d: int(d.find_element(By.ID, "adapter-list").get_attribute("data-loaded")) > shown_load)
    adapter = browser.find_element(By.ID, "adapter-ink")
    adapter.click()
    slider = browser.find_element(By.ID, "adapter-ink-weight")
    browser.execute_script(
        "arguments[0].value = '0.75'; arguments[0].dispatchEvent(new Event('input'))", slider
    )
    steps = browser.find_element(By.ID, "steps")
    steps.clear()
    steps.send_keys(str(STEPS))
    browser.find_element(By.ID, "random-seed").click()  # a fixed seed, to compare with the API
    browser.find_element(By.ID, "generate").click()

    wait.until(lambda d: d.find_element(By.ID, "status").text == "Done.")
    previews = int(browser.find_element(By.ID, "preview").get_attribute("data-previews"))
    assert previews >= 1
    result = browser.find_element(By.ID, "result")
    assert result.is_displayed() and not browser.find_element(By.ID, "preview").is_displayed()
    params = browser.find_element(By.ID, "result-params").text
    assert "6 steps" in params and "ink×0.75" in params and "seed 0" in params
    download = browser.find_element(By.ID, "download")
    assert download.get_attribute("download") == "deft-0.png"
    assert len(browser.find_elements(By.CSS_SELECTOR, "#gallery img")) == 1
    shown = _png(result.get_attribute("src"))
    browser.save_screenshot(str(tmp_path / "playground.png"))
    assert (tmp_path / "playground.png").stat().st_size > 0

    # the page sent what it showed: the same request over the API gives the same pixels
    body = {"prompt": browser.find_element(By.ID, "prompt").get_attribute("value"), "size": "64x64"}
    body |= {"steps": STEPS, "seed": 0, "guidance_scale": 5.0, "adapters": [{"name": "ink", "weight": 0.75}]}
    reply = httpx2.post(
        server.http_url + "/v1/images/generations",
        json=body,
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=TIMEOUT_S,
    )
    expected = base64.b64decode(reply.json()["data"][0]["b64_json"])
    assert np.array_equal(shown, np.asarray(Image.open(io.BytesIO(expected)).convert("RGB")))


def test_upload_form_registers_an_adapter(browser, server, tmp_path):
    wait = WebDriverWait(browser, TIMEOUT_S)
    shapes = BaseView(build_tiny_sdxl(0).unet).layer_shapes
    path = save_adapter(random_adapter(AdapterKind.LORA, shapes, rank=4, seed=2), tmp_path / "up.safetensors")
    browser.find_element(By.ID, "upload-name").send_keys("uploaded")
    browser.find_element(By.ID, "upload-file").send_keys(str(path))
    browser.find_element(By.CSS_SELECTOR, "#upload-form button").click()
    wait.until(lambda d: "Registered uploaded" in d.find_element(By.ID, "upload-status").text)
    wait.until(lambda d: d.find_elements(By.ID, "adapter-uploaded"))
    with DeftClient(server.address, token=TOKEN) as client:
        assert client.get_adapter("uploaded").kind == "lora"


def test_narrow_screen_keeps_one_column(browser, server):
    browser.set_window_size(390, 844)
    try:
        browser.get(server.http_url + "/")
        form = browser.find_element(By.ID, "generate-form").rect
        output = browser.find_element(By.ID, "output").rect
        assert output["y"] > form["y"] + form["height"] - 1  # stacked, not side by side
        scroll, visible = browser.execute_script(
            "return [document.documentElement.scrollWidth, document.documentElement.clientWidth]"
        )
        assert form["width"] <= visible and scroll <= visible, "no horizontal scrolling"
    finally:
        browser.set_window_size(1280, 900)


def test_every_control_has_a_label(browser, server):
    browser.get(server.http_url + "/")
    unlabeled = browser.execute_script(
        "return [...document.querySelectorAll('input, textarea, select')]"
        ".filter(e => !e.labels || e.labels.length === 0).map(e => e.id)"
    )
    assert unlabeled == []

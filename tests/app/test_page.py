"""The page for people (GET /): open, self-contained, behind a strict Content-Security-Policy; in a real headless
Chromium it classifies an image, a text and both through the public API, and asks for the API key when the
server wants one."""

from __future__ import annotations

import re
import shutil
import tomllib
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageDraw
from servicekit import API_KEY, ROOT, Server, encode

from app.routes.page import ASSETS, CONTENT_SECURITY_POLICY

STATIC = ROOT / "app" / "static"
PAGE_FILES = ["/", *(f"/static/{name}" for name in ASSETS)]
BROWSER_WAIT_S = 30


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small JPEG: sky, sea and a boat-like shape."""
    image = Image.new("RGB", (64, 64), (135, 180, 230))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 38, 63, 63), fill=(20, 70, 140))
    draw.polygon([(14, 36), (50, 36), (44, 44), (20, 44)], fill=(230, 230, 230))
    draw.rectangle((30, 16, 32, 36), fill=(90, 60, 30))
    path = tmp_path_factory.mktemp("photo") / "boat.jpg"
    path.write_bytes(encode(image, "JPEG", quality=90))
    return path


# ---- plain HTTP -----------------------------------------------------------------------------------------------

def test_page_is_html_behind_a_strict_content_security_policy(bundled_server: Server) -> None:
    response = httpx.get(bundled_server.url + "/", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert "default-src 'self'" in CONTENT_SECURITY_POLICY and "script-src 'self';" in CONTENT_SECURITY_POLICY
    assert "unsafe-inline" not in CONTENT_SECURITY_POLICY and "unsafe-eval" not in CONTENT_SECURITY_POLICY
    assert response.headers["x-content-type-options"] == "nosniff"
    html = response.text
    assert '<script src="static/page.js"' in html and '<link rel="stylesheet" href="static/page.css">' in html
    assert re.search(r"<script(?![^>]*\bsrc=)", html) is None  # no inline script: every script tag loads a file
    assert "<style" not in html and " style=" not in html


@pytest.mark.parametrize("name", sorted(ASSETS))
def test_page_assets_are_served_from_the_package(bundled_server: Server, name: str) -> None:
    response = httpx.get(f"{bundled_server.url}/static/{name}", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"] == ASSETS[name]
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.content == (STATIC / name).read_bytes()


@pytest.mark.parametrize("name", ["page.html", "..%2Fmain.py", "missing.js"])
def test_only_the_listed_assets_are_served(bundled_server: Server, name: str) -> None:
    response = httpx.get(f"{bundled_server.url}/static/{name}", timeout=10)
    assert response.status_code == 404
    assert "detail" in response.json()


def test_page_and_assets_name_no_other_host(bundled_server: Server) -> None:
    for path in PAGE_FILES:
        text = httpx.get(bundled_server.url + path, timeout=10).text
        assert re.findall(r"https?://|(?:src|href|url)\s*[=(]\s*[\"']?//", text) == [], path


def test_page_is_open_while_the_api_wants_a_key(main_server: Server) -> None:
    for path in PAGE_FILES:
        assert httpx.get(main_server.url + path, timeout=10).status_code == 200, path
    assert httpx.get(main_server.url + "/v1/models", timeout=10).status_code == 401


def test_page_is_not_part_of_the_openapi_document(bundled_server: Server) -> None:
    paths = httpx.get(bundled_server.url + "/openapi.json", timeout=10).json()["paths"]
    assert "/" not in paths and not any(path.startswith("/static") for path in paths)


def test_page_files_ship_as_package_data() -> None:
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["app"]
    shipped = {f"static/{name}" for name in [*ASSETS, "page.html"]}
    assert {f"static/{path.name}" for path in STATIC.iterdir()} == shipped
    assert all(any(fnmatch(path, pattern) for pattern in patterns) for path in shipped)


# ---- in a real browser ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """Debian's headless Chromium through its chromedriver (both from ``make system-tools``)."""
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        pytest.skip("chromium and chromedriver are not installed: run `make system-tools` (Debian's chromium and "
                    "chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     f"--user-data-dir={tmp_path_factory.mktemp('chromium')}", "--window-size=1100,1300"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    driver.set_page_load_timeout(BROWSER_WAIT_S)
    try:
        yield driver
        problems = [entry["message"] for entry in driver.get_log("browser")
                    if "Content Security Policy" in entry["message"] or "Refused to" in entry["message"]]
        assert problems == [], "the page broke its own Content-Security-Policy"
    finally:
        driver.quit()


def _open(driver, url: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url + "/")
    driver.execute_script("sessionStorage.clear()")
    driver.get(url + "/")
    # the models are loaded once the select leaves its "loading models…" state
    WebDriverWait(driver, BROWSER_WAIT_S).until(
        lambda d: "loading" not in d.find_element(By.ID, "model-select").text)


def _options(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    return [o.get_attribute("value") for o in driver.find_elements(By.CSS_SELECTOR, "#model-select option")]


def _classify_and_read(driver, classes: int) -> dict[str, object]:
    """Click classify, wait for ``classes`` bars; the shown top class, model line and (label, percent) rows."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    for old in driver.find_elements(By.CSS_SELECTOR, "#bars li"):
        driver.execute_script("arguments[0].remove()", old)
    driver.find_element(By.ID, "classify").click()
    WebDriverWait(driver, BROWSER_WAIT_S).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "#bars li.bar-row")) >= classes
        or d.find_element(By.ID, "error").is_displayed())
    assert not driver.find_element(By.ID, "error").is_displayed(), driver.find_element(By.ID, "error").text
    rows = driver.find_elements(By.CSS_SELECTOR, "#bars li.bar-row")
    bars = [(row.find_element(By.CLASS_NAME, "bar-label").text, row.find_element(By.CLASS_NAME, "bar-value").text)
            for row in rows]
    return {"top": driver.find_element(By.ID, "top-label").text, "model": driver.find_element(By.ID, "model-name").text,
            "calibration": driver.find_element(By.ID, "model-calibration").text, "bars": bars}


def _check_distribution(shown: dict, classes: list[str], api_top: str) -> None:
    bars = shown["bars"]
    assert sorted(label for label, _ in bars) == sorted(classes)  # the whole distribution, one bar per class
    percents = [float(value.strip("<>%")) for _, value in bars]  # "<0.1%" and ">99.9%" at the ends
    assert percents == sorted(percents, reverse=True)
    assert abs(sum(percents) - 100) <= 0.1 * len(percents) + 1e-6  # each shown to 0.1 %
    assert shown["top"] == api_top == bars[0][0]


def _model(url: str, name: str, key: str | None = None) -> dict:
    return httpx.get(f"{url}/v1/models/{name}", headers={"X-API-Key": key} if key else {}, timeout=10).json()


def test_page_classifies_a_chosen_image_with_any_image_model(bundled_server: Server, browser, photo: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    url = bundled_server.url
    _open(browser, url)
    browser.find_element(By.ID, "image-input").send_keys(str(photo))
    image_models = ["cifar10-ensemble", "cifar10-fastconv", "cifar10-trunk"]
    assert _options(browser) == image_models  # image models only, the default first
    for name in image_models:
        Select(browser.find_element(By.ID, "model-select")).select_by_value(name)
        shown = _classify_and_read(browser, 10)
        info = _model(url, name)
        answer = httpx.post(f"{url}/v1/image/classify", params={"model": name},
                            files={"file": (photo.name, photo.read_bytes(), "image/jpeg")}, timeout=30).json()
        _check_distribution(shown, info["classes"], answer["predictions"][0]["label"])
        assert shown["model"].startswith(f"{name} (version ")
        assert f"temperature {info['calibration']['temperature']:.2f}" in shown["calibration"]
        assert "ECE " in shown["calibration"]
        assert ("top-label map" in shown["calibration"]) == ("top_label" in info["calibration"])


def test_page_classifies_a_typed_text_with_either_text_model(bundled_server: Server, browser) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    url = bundled_server.url
    text = "The goalie made 40 saves in the playoff game last night and the crowd went wild."
    _open(browser, url)
    browser.find_element(By.ID, "text-input").send_keys(text)
    assert _options(browser) == ["20news-text", "20news-trunk"]  # text models only, the default (n-gram) first
    for name in ("20news-text", "20news-trunk"):
        Select(browser.find_element(By.ID, "model-select")).select_by_value(name)
        shown = _classify_and_read(browser, 20)
        answer = httpx.post(f"{url}/v1/text/classify", params={"model": name}, json={"text": text}, timeout=30).json()
        _check_distribution(shown, _model(url, name)["classes"], answer["predictions"][0]["label"])
        assert shown["model"].startswith(f"{name} (version ")


def test_page_classifies_an_image_with_its_text_with_a_multimodal_model(bundled_server: Server, browser,
                                                                       photo: Path) -> None:
    from selenium.webdriver.common.by import By

    url = bundled_server.url
    text = "best day ever at the beach #sunshine"
    _open(browser, url)
    browser.find_element(By.ID, "image-input").send_keys(str(photo))
    browser.find_element(By.ID, "text-input").send_keys(text)
    assert _options(browser) == ["mvsa-fusion"]
    shown = _classify_and_read(browser, 3)
    answer = httpx.post(f"{url}/v1/multimodal/classify", data={"texts": text},
                        files={"files": (photo.name, photo.read_bytes(), "image/jpeg")}, timeout=30).json()
    _check_distribution(shown, _model(url, "mvsa-fusion")["classes"], answer["predictions"][0]["label"])


def test_page_asks_for_the_api_key_and_keeps_it_for_the_session(main_server: Server, browser, photo: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url = main_server.url
    _open(browser, url)
    key_form = browser.find_element(By.ID, "key-form")
    assert key_form.is_displayed()  # GET v1/models answered 401
    browser.find_element(By.ID, "key-input").send_keys("not-a-key")
    browser.find_element(By.ID, "key-submit").click()
    WebDriverWait(browser, BROWSER_WAIT_S).until(lambda d: "not accepted" in d.find_element(By.ID, "key-message").text)
    browser.find_element(By.ID, "key-input").send_keys(API_KEY)
    browser.find_element(By.ID, "key-submit").click()
    WebDriverWait(browser, BROWSER_WAIT_S).until(lambda d: not d.find_element(By.ID, "key-form").is_displayed())
    assert browser.execute_script("return sessionStorage.getItem('crossmodal.apiKey')") == API_KEY

    browser.find_element(By.ID, "image-input").send_keys(str(photo))
    assert _options(browser) == ["tiny-fastconv", "tiny-lenet"]
    shown = _classify_and_read(browser, 10)
    answer = httpx.post(f"{url}/v1/image/classify", headers={"X-API-Key": API_KEY},
                        files={"file": (photo.name, photo.read_bytes(), "image/jpeg")}, timeout=30).json()
    _check_distribution(shown, _model(url, "tiny-fastconv", API_KEY)["classes"], answer["predictions"][0]["label"])
    assert shown["calibration"] == "temperature 1.00"  # the tiny checkpoints record no ECE


def test_page_shows_the_api_error_in_plain_words(main_server: Server, browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url = main_server.url
    _open(browser, url)
    browser.execute_script("sessionStorage.setItem('crossmodal.apiKey', arguments[0])", API_KEY)
    browser.get(url + "/")  # the stored key is sent from the start: no question asked
    WebDriverWait(browser, BROWSER_WAIT_S).until(
        lambda d: "loading" not in d.find_element(By.ID, "model-select").text)
    assert not browser.find_element(By.ID, "key-form").is_displayed()
    fake = tmp_path / "notes.jpg"
    fake.write_text("<b>not an image</b>")
    browser.find_element(By.ID, "image-input").send_keys(str(fake))
    browser.find_element(By.ID, "classify").click()
    error = browser.find_element(By.ID, "error")
    WebDriverWait(browser, BROWSER_WAIT_S).until(lambda d: error.is_displayed())
    assert error.text.startswith("That file is not an image format the service reads: ")
    assert error.find_elements(By.TAG_NAME, "b") == []  # text, never markup

"""The web page at / in a real browser: Debian's headless Chromium driven by Selenium, against the
session stack. It asserts what a person sees: the top label, the bars, the API's error messages,
the model version, and that the page works by keyboard and at phone width.

Chromium and its driver come from Debian (`apt-get install chromium chromium-driver`, which
.ci/run does); nothing downloads a browser: the driver's path is given, so Selenium Manager never
runs. Screenshots are kept in the pytest temporary directory (the path is printed); the README's
docs/screenshot.png is the first test's steps against `make up`'s stack, which serves the shipped
version number (the test stack numbers its copy 1)."""
import shutil
from pathlib import Path

import pytest
import requests

from scripts.stack import LocalStack, Ports, free_port
from tests.helpers import ASSETS, wait_until

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
TEXT_FILE = b"meeting notes: buy frog food\n"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        pytest.fail(f"the browser test needs Debian's Chromium: {', '.join(missing)} missing. "
                    "Install it with `apt-get install -y chromium chromium-driver` (.ci/run does).", pytrace=False)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.selenium_manager import SeleniumManager

    def no_download(*_args, **_kwargs):
        raise AssertionError("Selenium Manager must not run: the browser and driver are Debian's")

    logs = tmp_path_factory.mktemp("chromium")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1100,820", "--force-device-scale-factor=1", "--disable-extensions",
                     f"--user-data-dir={logs / 'profile'}"):
        options.add_argument(argument)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SeleniumManager, "binary_paths", no_download)
        driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER),
                                                  log_output=str(logs / "chromedriver.log")), options=options)
        try:
            yield driver
        finally:
            driver.quit()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("screenshots")
    print(f"screenshots in {folder}")
    return folder


def files_to_upload(tmp_path: Path, names: list[str]) -> str:
    """Paths for the file input, one per line: copies, so the page shows these file names."""
    paths = []
    for name in names:
        path = tmp_path / name
        if name.endswith(".txt"):
            path.write_bytes(TEXT_FILE)
        else:
            shutil.copyfile(ASSETS / name, path)
        paths.append(str(path))
    return "\n".join(paths)


def classified(driver, count: int):
    """The result cards once all `count` have an answer."""
    from selenium.webdriver.common.by import By
    cards = driver.find_elements(By.CSS_SELECTOR, "#results > .result")
    if len(cards) != count or any("Classifying" in card.find_element(By.CLASS_NAME, "outcome").text for card in cards):
        return None
    return cards


def test_a_person_classifies_a_photo_and_sees_the_error_for_a_text_file(stack, browser, tmp_path, screenshots):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    browser.set_window_size(1100, 820)
    browser.get(f"{stack.gateway_url}/")
    assert browser.title == "CIFAR-10 classifier"
    version = requests.get(f"{stack.gateway_url}/readyz?deep=1", timeout=10).json()["model_version"]
    model_line = browser.find_element(By.ID, "model")
    WebDriverWait(browser, 20).until(lambda _: "version" in model_line.text)
    assert f"version {version}" in model_line.text and "test accuracy" in model_line.text

    upload = browser.find_element(By.ID, "images")
    assert upload.get_attribute("multiple") == "true"
    upload.send_keys(files_to_upload(tmp_path, ["frog.jpg", "notes.txt", "cifar-ship-32x32.png"]))
    frog, notes, ship = WebDriverWait(browser, 60).until(lambda driver: classified(driver, 3))

    # The photo: its top label, five bars with their probabilities, the model version.
    assert frog.find_element(By.CLASS_NAME, "filename").text == "frog.jpg"
    assert frog.find_element(By.CLASS_NAME, "top-label").text == "frog"
    assert f"model version {version}" in frog.find_element(By.CLASS_NAME, "outcome").text
    for card in (frog, ship):
        rows = card.find_elements(By.CSS_SELECTOR, ".predictions .prediction")
        assert len(rows) == 5
        shares = [float(row.find_element(By.CLASS_NAME, "percent").text.rstrip("%")) for row in rows]
        assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 100.01
        widths = [row.find_element(By.CSS_SELECTOR, ".bar span").size["width"] for row in rows]
        assert widths == sorted(widths, reverse=True) and widths[0] > 0
    assert frog.find_element(By.CSS_SELECTOR, ".prediction .class-name").text == "frog"

    # The text file: the message the API gives for it, word for word.
    api = requests.post(f"{stack.gateway_url}/predict", files=[("image", ("frog.jpg", (ASSETS / "frog.jpg").read_bytes())),
                                                               ("image", ("notes.txt", TEXT_FILE))], timeout=60)
    expected = api.json()["results"][1]["error"]
    assert expected["code"] == "invalid_image"
    assert "failed" in notes.get_attribute("class").split()
    assert notes.find_element(By.CLASS_NAME, "error-message").text == expected["message"]
    assert "invalid_image" in notes.find_element(By.CLASS_NAME, "error-code").text
    assert not notes.find_elements(By.CSS_SELECTOR, ".prediction")
    assert browser.find_element(By.ID, "status").text == "2 of 3 images classified."
    assert not browser.find_element(By.ID, "request-error").is_displayed()
    browser.save_screenshot(str(screenshots / "desktop.png"))


def test_a_request_error_is_shown_as_the_api_states_it(stack, browser, tmp_path, screenshots):
    """A full queue (here: a gateway allowing one job at a time, sent two images): the page shows
    the JSON error's message and marks every image of the request."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    local = LocalStack(tmp_path, Ports(free_port(), stack.ports.redis, 0, 0), stack.model_base_path,
                       env={"QUEUE_MAXLEN": "1", "WEB_CONCURRENCY": "1", "GUNICORN_THREADS": "4"})
    local.start_gateway()
    try:
        wait_until(lambda: _answers(f"{local.gateway_url}/healthz"), what="the extra gateway")
        api = requests.post(f"{local.gateway_url}/predict", timeout=30,
                            files=[("image", ("a.jpg", (ASSETS / "frog.jpg").read_bytes()))] * 2)
        assert api.status_code == 503 and api.json()["error"]["code"] == "queue_full"
        browser.get(f"{local.gateway_url}/")
        browser.find_element(By.ID, "images").send_keys(files_to_upload(tmp_path, ["frog.jpg", "cifar-ship-32x32.png"]))
        cards = WebDriverWait(browser, 30).until(lambda driver: classified(driver, 2))
        banner = browser.find_element(By.ID, "request-error")
        assert banner.is_displayed()
        assert banner.text == f"Not classified: {api.json()['error']['message']} (retry in 1 s)"
        for card in cards:
            assert card.find_element(By.CLASS_NAME, "error-message").text == api.json()["error"]["message"]
        assert browser.find_element(By.ID, "status").text == "0 of 2 images classified."
        browser.save_screenshot(str(screenshots / "queue-full.png"))
    finally:
        local.stop_all()


def test_the_page_works_by_keyboard_and_at_phone_width(stack, browser, tmp_path, screenshots):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    browser.set_window_size(390, 844)
    try:
        browser.get(f"{stack.gateway_url}/")
        # The file chooser is a labelled control, and the first thing Tab reaches.
        upload = browser.find_element(By.ID, "images")
        assert browser.execute_script("return arguments[0].labels.length", upload) == 1
        assert "Choose images" in browser.find_element(By.CSS_SELECTOR, "label[for=images]").text
        ActionChains(browser).send_keys(Keys.TAB).perform()
        assert browser.switch_to.active_element.get_attribute("id") == "images"
        # ...and its focus is visible: the label drawn around the hidden input gets an outline.
        outline = browser.execute_script(
            "const s = getComputedStyle(document.querySelector('label[for=images]'));"
            "return [s.outlineStyle, parseFloat(s.outlineWidth)];")
        assert outline[0] != "none" and outline[1] >= 2, outline

        upload.send_keys(files_to_upload(tmp_path, ["frog.jpg", "notes.txt"]))
        frog, notes = WebDriverWait(browser, 60).until(lambda driver: classified(driver, 2))
        assert frog.find_element(By.CLASS_NAME, "top-label").text == "frog"
        assert notes.find_element(By.CLASS_NAME, "error-message").text
        # Nothing wider than the phone: no sideways scrolling, cards one above the other.
        assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        assert frog.location["y"] < notes.location["y"] and frog.location["x"] == notes.location["x"]
        for card in (frog, notes):
            assert card.location["x"] >= 0 and card.location["x"] + card.size["width"] <= 390
        browser.save_screenshot(str(screenshots / "phone.png"))
    finally:
        browser.set_window_size(1100, 820)


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).ok
    except requests.ConnectionError:
        return False

"""The playground in a real headless browser (Debian's Chromium driven by Selenium through Debian's
chromedriver) against the real local stack: ``make serve``'s pieces with the tiny test model.

``make test`` installs the browser first (``make install-browser``); without it these tests fail with a
line saying so, they are never skipped.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import TEST_MODEL_NAME
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from sd_lambda.devtools.local.frontdoor import FrontDoor, function_url_event
from sd_lambda.devtools.local.launcher import LocalLambda

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# Upper bounds, never a pace: the first request starts the function (torch import + model load) on a
# busy two-core machine.
WAIT = 300


class Stack:
    def __init__(self, environment: LocalLambda, door: FrontDoor) -> None:
        self.environment, self.door = environment, door


@pytest.fixture(scope="module")
def stack(module_model_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    log_path = tmp_path_factory.mktemp("playground") / "lambda.log"
    env = {"MODEL_ROOT": str(module_model_root), "MODEL_NAME": TEST_MODEL_NAME}
    with (
        LocalLambda(env, timeout_s=WAIT, log_path=log_path) as environment,
        FrontDoor(environment.invoke) as door,
    ):
        yield Stack(environment, door)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.is_file()]
    if missing:
        pytest.fail(f"{' and '.join(missing)} missing: run make install-browser (make test does)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root, where Chromium's sandbox cannot start
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--window-size=1200,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager never runs, so nothing is downloaded.
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def fill(driver: WebDriver, field: str, value: str) -> None:
    control = driver.find_element(By.ID, field)
    control.clear()
    control.send_keys(value)


def submit(driver: WebDriver) -> None:
    """Click Generate and wait until the request has finished: the page disables the button in the
    submit handler (which runs within the click) and enables it again once the answer is shown."""
    button = driver.find_element(By.ID, "generate")
    button.click()
    WebDriverWait(driver, WAIT).until(lambda _: button.is_enabled())


def results(driver: WebDriver) -> list[WebElement]:
    """The images shown; fails with the page's error text when it shows an error instead."""
    error = driver.find_element(By.ID, "error")
    assert error.get_attribute("hidden") is not None, error.text
    return driver.find_elements(By.CSS_SELECTOR, "#results figure")


def shown_image(element: WebElement) -> Image.Image:
    url = str(element.get_attribute("src"))
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    image = Image.open(io.BytesIO(base64.b64decode(url.removeprefix(prefix))))
    image.load()
    return image


def test_a_prompt_typed_in_the_page_comes_back_as_images_with_their_seeds(
    stack: Stack, browser: WebDriver, tmp_path: Path
) -> None:
    browser.get(f"{stack.door.url}/")
    assert browser.title == "sd-lambda playground (local)"
    fill(browser, "prompt", "a red fox in fresh snow")
    fill(browser, "num_inference_steps", "1")
    fill(browser, "seed", "41")
    fill(browser, "num_images", "2")
    submit(browser)
    figures = results(browser)
    assert [f.find_element(By.CLASS_NAME, "seed").text for f in figures] == ["seed 41", "seed 42"]
    images = [shown_image(f.find_element(By.TAG_NAME, "img")) for f in figures]
    assert [image.size for image in images] == [(64, 64), (64, 64)]
    assert images[0].tobytes() != images[1].tobytes()
    timings = browser.find_element(By.CSS_SELECTOR, "#results table.timings").text
    assert "inference" in timings
    assert "load" in timings
    # After the first request the model is loaded: the choices come from GET /health.
    WebDriverWait(browser, WAIT).until(
        lambda d: (
            "euler"
            in [o.get_attribute("value") for o in d.find_elements(By.CSS_SELECTOR, "#scheduler option")]
        )
    )

    # Image to image: a file chosen in the page goes as init_image, with the strength the slider shows.
    start = tmp_path / "start.png"
    Image.new("RGB", (48, 32), (200, 40, 40)).save(start)
    browser.find_element(By.ID, "init-file").send_keys(str(start))
    slider = browser.find_element(By.ID, "strength")
    WebDriverWait(browser, WAIT).until(lambda _: slider.is_enabled())
    slider.send_keys(Keys.LEFT * 6)  # 0.8 -> 0.5 in steps of 0.05
    assert browser.find_element(By.ID, "strength-value").text == "0.5"
    fill(browser, "num_images", "1")
    submit(browser)
    (figure,) = results(browser)
    assert shown_image(figure.find_element(By.TAG_NAME, "img")).size == (48, 32)  # the start image's size
    assert "from the chosen image at strength 0.5" in browser.find_element(By.ID, "facts").text
    # Under the page's Content-Security-Policy nothing was refused and nothing failed to load.
    problems = [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert problems == []


def test_the_api_error_for_a_blank_prompt_is_shown_and_the_function_itself_has_no_page(
    stack: Stack, browser: WebDriver
) -> None:
    browser.get(f"{stack.door.url}/")
    fill(browser, "prompt", "   ")
    submit(browser)
    error = browser.find_element(By.ID, "error").text
    assert browser.find_element(By.ID, "results").text == ""
    assert browser.find_element(By.ID, "error-code").text == "empty"
    assert "HTTP 400" in error
    assert "prompt must not be empty or blank" in error
    # The page is the front door's: the function URL's own GET / is still 405, with no HTML.
    result = stack.environment.invoke(function_url_event("GET", "/", [("accept", "text/html")], b""))
    response = json.loads(result.payload or b"")
    assert response["statusCode"] == 405
    assert json.loads(response["body"])["error"]["code"] == "method_not_allowed"

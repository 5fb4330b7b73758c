"""Driving the web chat page in a real headless Chromium (Debian's chromium + chromium-driver, through selenium):
the browser and the few gestures the page tests share. Importing it skips the importing test module where
selenium or the browser is missing."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pytest

CHROMIUM, DRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
except ImportError as e:  # pragma: no cover - the test extra installs selenium
    pytest.skip(f"selenium is not installed ({e})", allow_module_level=True)
if not (CHROMIUM.is_file() and DRIVER.is_file()):  # pragma: no cover - the README's test command installs them
    pytest.skip("no /usr/bin/chromium or /usr/bin/chromedriver: apt-get install chromium chromium-driver "
                "(the README's test command does)", allow_module_level=True)


def chromium(width: int = 1280, height: int = 900):
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", f"--window-size={width},{height}",
                f"--user-data-dir={tempfile.mkdtemp(prefix='nld-chromium-')}"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(str(DRIVER)))


def wait(condition, timeout: float = 120, what: str = "the page"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def answers(driver) -> list:
    return driver.find_elements(By.CSS_SELECTOR, ".turn.assistant.done")


def ask(driver, text: str, done_before: int):
    box = driver.find_element(By.ID, "prompt")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)
    return wait(lambda: answers(driver)[done_before] if len(answers(driver)) > done_before else None,
                what=f"answer {done_before + 1}")


def set_field(driver, element_id: str, value: str) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def content(turn) -> str:
    return turn.find_element(By.CSS_SELECTOR, ".answer").get_attribute("textContent")


def ready(driver, url: str) -> None:
    driver.get(url)
    wait(lambda: "ready" in driver.find_element(By.ID, "health").text, what="the health badge")

"""A real headless browser for the test suite: Debian's chromium driven by selenium.

Stable API (other tests import it):

- `browser` (pytest fixture, function scope): a selenium Chrome webdriver running
  `/usr/bin/chromium` headless (`--headless=new --no-sandbox`) through
  `/usr/bin/chromedriver` (so selenium never downloads a driver), with the browser
  console captured (`goog:loggingPrefs` browser ALL). Quit after the test.
- `console_errors(driver) -> list[str]`: the SEVERE console messages logged so far
  (each call drains the log, as chromedriver does).
- `new_driver(offline=False)`: the same driver outside a fixture (the caller quits
  it); `offline=True` turns networking off (DevTools network emulation), for pages
  that must open without a network.

Missing pieces are installed like the SLURM/PostgreSQL servers: Debian `chromium`
and `chromium-driver` with apt-get (root, file-locked: `services.apt_install`), and
`selenium` with pip. Anything that cannot be installed skips the test with the
reason, or fails it when HPCBATCH_REQUIRE_SERVICES=1 (CI never skips silently).

Usage: tests/conftest.py imports the fixture, so a test just takes a `browser`
argument (mark it `browser`); `from browser import console_errors` for the helper.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import services  # noqa: E402  (tests/ is not a package)

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WINDOW = (1400, 1000)


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("HPCBATCH_REQUIRE_SERVICES") == "1":
        pytest.fail(f"required test service unavailable: {reason}", pytrace=False)
    pytest.skip(reason)


def _ensure_selenium() -> None:
    """Import selenium, pip-installing it first when missing."""
    try:
        importlib.import_module("selenium.webdriver")
        return
    except ImportError:
        pass
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "selenium>=4.10"],
        capture_output=True, text=True, timeout=600,
    )
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-2:]
        raise services.ServiceUnavailable(f"pip install selenium failed: {' | '.join(tail)}")
    importlib.invalidate_caches()
    importlib.import_module("selenium.webdriver")


def ensure_browser() -> None:
    """Install chromium, chromium-driver (apt) and selenium (pip) when missing."""
    services.apt_install(
        ["chromium", "chromium-driver"], services.have_binaries(CHROMIUM, CHROMEDRIVER)
    )
    _ensure_selenium()


def new_driver(offline: bool = False):
    """A headless chromium webdriver with console capture (the caller quits it)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        f"--window-size={WINDOW[0]},{WINDOW[1]}", "--no-first-run",
        "--disable-extensions", "--disable-background-networking",
    ):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    if offline:
        driver.execute_cdp_cmd("Network.enable", {})
        driver.execute_cdp_cmd(
            "Network.emulateNetworkConditions",
            {"offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
        )
    return driver


def console_logs(driver) -> list[dict]:
    """Every console entry since the last call (dicts with level, message, timestamp)."""
    return list(driver.get_log("browser"))


def console_errors(driver) -> list[str]:
    """The SEVERE console messages logged since the last call (drains the log)."""
    return [e["message"] for e in console_logs(driver) if e.get("level") == "SEVERE"]


@pytest.fixture
def browser() -> Iterator:
    """A headless selenium Chrome (Debian chromium) webdriver; quit after the test."""
    try:
        ensure_browser()
        driver = new_driver()
    except (services.ServiceUnavailable, OSError, subprocess.SubprocessError) as e:
        _skip_or_fail(f"headless chromium unavailable: {e}")
    except Exception as e:  # selenium's WebDriverException: chromium would not start
        _skip_or_fail(f"headless chromium would not start: {type(e).__name__}: {e}")
    try:
        yield driver
    finally:
        driver.quit()

"""A real browser: headless Chromium opens the chat of both examples in pages served by different workers.

A message typed in one page must appear in every page exactly once. The
browser is Debian's ``chromium`` with ``chromium-driver``, driven by
selenium (``.ci/run`` installs them). On a machine without them these tests
skip with the line that installs them; under CI (``CI`` set) a missing
browser fails instead, since CI must run them.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from typing import Any, Callable, Dict, Iterator, List, Tuple

import pytest

from .runner_harness import Run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
HOW = "apt-get install chromium chromium-driver && pip install selenium (as .ci/run does)"
PAGES = 3
WORKERS = 4


def _need_browser() -> None:
    missing = []
    if CHROMIUM is None or CHROMEDRIVER is None:
        missing.append("chromium and chromedriver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium")
    if missing:
        message = f"no {' or '.join(missing)}: {HOW}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def browser() -> Iterator[Any]:
    """One headless Chromium; each page is a window of its own."""
    _need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # type: ignore[assignment]
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                # every page on a host name of its own: a connection of its own, so the workers' accept() race decides
                "--host-resolver-rules=MAP *.chat.test 127.0.0.1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(condition: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _open_pages(driver: Any, port: int, worker_of: Callable[[Any], int], live: Callable[[Any], bool]) -> List[Tuple[str, int]]:
    """Open pages on new host names until ``PAGES`` of them were served by different workers; return (handle, worker)."""
    pages: Dict[int, str] = {}
    for attempt in range(60):
        if len(pages) == PAGES:
            break
        if attempt:
            driver.switch_to.new_window("window")
        driver.get(f"http://p{attempt}.chat.test:{port}/")
        worker = worker_of(driver)
        if worker in pages:
            driver.close()
            driver.switch_to.window(next(iter(pages.values())))
            continue
        pages[worker] = driver.current_window_handle
    assert len(pages) == PAGES, f"{PAGES} pages on different workers not reached in 60 tries: {sorted(pages)}"
    for worker, handle in pages.items():
        driver.switch_to.window(handle)
        _wait(lambda: live(driver), f"the page of worker {worker} to go live")
    return [(handle, worker) for worker, handle in pages.items()]


def _check_exactly_once(driver: Any, pages: List[Tuple[str, int]], items: str, send: Callable[[Any, str], None]) -> None:
    from selenium.webdriver.common.by import By

    text = f"hello {uuid.uuid4().hex[:8]}"
    driver.switch_to.window(pages[0][0])
    send(driver, text)

    def count_in(handle: str) -> int:
        driver.switch_to.window(handle)
        return sum(1 for li in driver.find_elements(By.CSS_SELECTOR, items) if text in li.text)

    for handle, worker in pages:
        _wait(lambda: count_in(handle) >= 1, f"the message in the page of worker {worker}")
    # Every page has it; give a duplicate the time the relay needs to deliver it, then count again.
    send(driver, "and a second one")
    for handle, worker in pages:
        driver.switch_to.window(handle)
        _wait(lambda: any("and a second one" in li.text for li in driver.find_elements(By.CSS_SELECTOR, items)),
              f"the second message in the page of worker {worker}")
        assert count_in(handle) == 1, f"the page of worker {worker} shows the message {count_in(handle)} times"


@pytest.mark.timeout(90)
def test_the_sse_chat_in_a_browser_reaches_every_page_exactly_once(browser: Any) -> None:
    from selenium.webdriver.common.by import By

    def worker_of(driver: Any) -> int:
        m = re.search(r"This page came from worker (\d+)", driver.page_source)
        assert m, driver.page_source[:500]
        return int(m.group(1))

    def live(driver: Any) -> bool:
        return bool(driver.find_element(By.ID, "state").text == "Live.")

    def send(driver: Any, text: str) -> None:
        box = driver.find_element(By.CSS_SELECTOR, "#send input[name=text]")
        box.send_keys(text)
        driver.find_element(By.CSS_SELECTOR, "#send button").click()

    with Run("examples.chat:main", "-w", str(WORKERS), "--bind", "127.0.0.1:0") as run:
        port = run.port()
        run.ready(WORKERS)
        pages = _open_pages(browser, port, worker_of, live)
        _check_exactly_once(browser, pages, "#log li", send)


@pytest.mark.timeout(90)
def test_the_asgi_chat_in_a_browser_reaches_every_page_exactly_once(browser: Any) -> None:
    from selenium.webdriver.common.by import By

    def worker_of(driver: Any) -> int:
        return int(driver.find_element(By.ID, "worker").text)

    def live(driver: Any) -> bool:
        return bool(driver.find_element(By.ID, "state").text == "Live.")

    def send(driver: Any, text: str) -> None:
        driver.find_element(By.ID, "text").send_keys(text)
        driver.find_element(By.ID, "send").click()

    with Run("examples.chat_asgi:app", "-w", str(WORKERS), "--bind", "127.0.0.1:0") as run:
        port = run.port()
        run.ready(WORKERS)
        pages = _open_pages(browser, port, worker_of, live)
        _check_exactly_once(browser, pages, "#messages li", send)

"""Driving the playground page in the system Chromium with Playwright (its own browser download is not used).

Shared by the browser tests (`test_playground.py`) and the README's screenshot (`playground_screenshot.py`).
The page sets a strict Content-Security-Policy, so waits here use locators: Playwright's string predicates
(`wait_for_function("...")`) are compiled inside the page and the policy refuses them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from playwright.sync_api import Browser, Page, sync_playwright

from tests.support.repo import REPO

# Where the tests leave their screenshots (CI can keep the folder); SEVI_TEST_ARTIFACTS moves it.
ARTIFACTS = Path(os.environ.get("SEVI_TEST_ARTIFACTS", REPO / "build" / "artifacts"))

_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CAPTION_TIMEOUT_MS = 180_000  # two shared cores: a comparison can queue behind other jobs


def find_chromium() -> str | None:
    """The browser to drive: $SEVI_CHROMIUM, else the first of the usual names on PATH (Debian's `chromium`)."""
    explicit = os.environ.get("SEVI_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    for name in _CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


@contextmanager
def chromium(executable: str) -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable)
        try:
            yield browser
        finally:
            browser.close()


def open_playground(page: Page, base_url: str) -> None:
    """Open the page through `/` (the redirect a person follows) and wait until its script has wired it up."""
    page.goto(base_url + "/")
    page.locator("body[data-ready=true]").wait_for(timeout=30_000)


def choose_sample(page: Page, label: str) -> None:
    page.get_by_role("button", name=label).click()
    page.locator(".sample[aria-pressed=true]").wait_for()  # the sample's bytes are in: Compare may run


@contextmanager
def comparison(page: Page, columns: int) -> Iterator[None]:
    """Around the action that starts a comparison: on leaving, it has finished (captions, marks and messages)
    with `columns` columns. Counted by the page (`body[data-runs]`), so the columns of the comparison before
    are never taken for this one's."""
    before = int(page.locator("body").get_attribute("data-runs") or "0")
    yield
    page.locator(f'body[data-runs="{before + 1}"]').wait_for(state="attached", timeout=CAPTION_TIMEOUT_MS)
    assert page.locator("#columns .column").count() == columns


def column_captions(page: Page) -> dict[float, str]:
    """level -> caption text of the finished columns."""
    out: dict[float, str] = {}
    for column in page.locator("#columns .column[data-state=done]").all():
        out[float(column.get_attribute("data-level") or "nan")] = column.locator(".caption").text_content() or ""
    return out


def column_facts(page: Page, level: float) -> dict[str, str]:
    column = page.locator(f'#columns .column[data-level="{level:g}"]')
    terms = column.locator(".facts dt").all_inner_texts()
    values = column.locator(".facts dd").all_inner_texts()
    return dict(zip(terms, values, strict=True))


def screenshot(page: Page, path: Path) -> Path:
    """The whole page at a viewport as tall as its content (the button bar is sticky to the viewport's bottom)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    size = page.viewport_size or {"width": 1280, "height": 800}
    height = int(page.evaluate("() => document.documentElement.scrollHeight"))
    page.set_viewport_size({"width": size["width"], "height": max(height, 400)})
    page.screenshot(path=str(path))
    page.set_viewport_size(size)
    return path

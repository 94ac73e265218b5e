"""Driving Sparrow Studio in Debian's Chromium with Playwright, and watching what the
page does: every console message, failed request and request to another host."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.sync_api import (
    Browser,
    ConsoleMessage,
    Locator,
    Page,
    Request,
    expect,
    sync_playwright,
)

CHROMIUM = "/usr/bin/chromium"
# As root on a machine with a closed network: no sandbox, and no background traffic of
# the browser's own (its updates, its sync).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Chromium's notes to developers, not errors of the page.
_VERBOSE = {"verbose", "debug", "info"}
# What Chromium logs for every answer of 400 or more, handled by the page or not.
_FAILED_LOAD = re.compile(
    r"error: Failed to load resource: the server responded with a status of (\d+)"
)


def chromium_missing() -> str | None:
    if shutil.which(CHROMIUM) is None:
        return f"Debian's chromium is not installed ({CHROMIUM}): apt-get install chromium"
    return None


@contextmanager
def chromium() -> Iterator[Browser]:
    missing = chromium_missing()
    if missing:
        pytest.skip(missing)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class Watched:
    """What one page did besides what the test asked of it."""

    base: str
    console: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    elsewhere: list[str] = field(default_factory=list)
    loads: int = 0  # of the page itself: live updates never reload it
    requests: list[str] = field(default_factory=list)

    def on_console(self, message: ConsoleMessage) -> None:
        if message.type not in _VERBOSE:
            self.console.append(f"{message.type}: {message.text}")

    def on_load(self, _page: object) -> None:
        self.loads += 1

    def on_request(self, request: Request) -> None:
        url = request.url
        if url.startswith(("blob:", "data:")):
            return
        if not url.startswith(self.base + "/"):
            self.elsewhere.append(url)
        self.requests.append(f"{request.method} {url.removeprefix(self.base)}")

    def on_failed(self, request: Request) -> None:
        if request.failure == "net::ERR_ABORTED" and (
            request.url.startswith("blob:")  # a player let go of audio already in memory
            or "/events?" in request.url  # an event stream never ends: closing it aborts it
        ):
            return
        self.failed.append(f"{request.method} {request.url}: {request.failure}")

    def assert_clean(self) -> None:
        assert self.elsewhere == [], "requests to other hosts"
        assert self.failed == [], f"failed requests: {self.failed}"
        assert self.console == [], "console messages"

    def failed_loads(self) -> list[int]:
        """The statuses of the error answers the console logged, once the console logged
        nothing else (a test that provokes errors checks exactly these)."""
        matched = [_FAILED_LOAD.match(line) for line in self.console]
        assert all(matched), self.console
        return [int(m[1]) for m in matched if m]

    def count(self, pattern: str) -> int:
        return sum(1 for r in self.requests if re.fullmatch(pattern, r))


def open_studio(browser: Browser, base: str, **context: object) -> tuple[Page, Watched]:
    """A new page on the studio (its own storage), watched from its first request."""
    page = browser.new_context(accept_downloads=True, **context).new_page()  # type: ignore[arg-type]
    watched = Watched(base)
    page.on("console", watched.on_console)
    page.on("pageerror", lambda error: watched.console.append(f"pageerror: {error}"))
    page.on("request", watched.on_request)
    page.on("requestfailed", watched.on_failed)
    page.on("load", watched.on_load)
    page.goto(base + "/")
    return page, watched


def node(page: Page, node_id: str) -> Locator:
    return page.locator(f"[data-testid=node][data-node-id='{node_id}']")


def upload(page: Page, clip: Path) -> None:
    page.get_by_test_id("upload-input").set_input_files(clip)
    expect(page.locator("[data-testid=node][data-status=ready]")).to_have_count(1, timeout=20_000)

"""Real-browser tests: Playwright drives Debian's Chromium (`make browser` installs it).

Use `live_server` for the site under test, `page` to drive it and `artifacts` for
screenshots. Data for the server thread needs `transactional_db` (not `db`): the live
server reads it from another connection, so it must be committed.

Playwright lives only while this package's tests run (package scope, not session): its
sync API marks an asyncio event loop as running in the test thread for as long as it is
started, which would break every later test of the same worker that calls asyncio.run()
(and would hide Django's async-safety check from them).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from tests.conftest import Site

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
TIMEOUT_MS = 10_000
CHROMIUM_ARGS = [
    "--no-sandbox",  # root in CI, no user namespaces
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    # No traffic of its own: the machine reaches nothing but the package registries.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="package")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make browser` (or `make test`) first")
    # Playwright's sync API keeps an asyncio event loop marked as running in this thread
    # while it is started, so Django takes the test's own ORM calls (creating users,
    # reading rows back, flushing the database) for calls from async code and raises
    # SynchronousOnlyOperation. They are not: each runs to completion on the test thread
    # while the browser waits. DJANGO_ALLOW_ASYNC_UNSAFE lifts the check, for exactly as
    # long as Playwright runs; the other tests keep it (Django reads it at every call).
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        with sync_playwright() as playwright:  # stopping it also unmarks the loop
            browser = playwright.chromium.launch(
                executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
            )
            yield browser
            browser.close()
    finally:
        if previous is None:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    try:
        yield context.new_page()
    finally:
        context.close()


@pytest.fixture
def artifacts() -> Path:
    """tests/artifacts/ (git-ignored): where browser tests save screenshots."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture
def asgi_server(start_site: Callable[..., Site]) -> str:
    """The site under uvicorn (ASGI, as in production: chat answers stream), on the
    test database; returns its base URL. live_server is WSGI, which cannot stream."""
    return start_site(LLM_USAGE_FLUSH_SECONDS="0").base_url

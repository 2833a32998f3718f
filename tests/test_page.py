"""The gateway's web page (``GET /``) in headless Chromium: it streams a job token by token,
cancels one, replays a finished one and shows the server's message for bad input.

Chromium is Debian's package (``make chromium`` installs it); Playwright only drives it, it never
downloads a browser. Without Chromium these tests fail rather than skip.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from producer import Client
from producer.protocol import EventType
from tests.conftest import Gateway

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

WAIT_MS = 30_000  # every browser-side wait has this deadline (Playwright takes milliseconds)


def chromium_path() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail(
            "no chromium on PATH: run `make chromium` (or `apt-get install chromium`); "
            "the page tests drive Debian's Chromium and never download a browser",
            pytrace=False,
        )
    return found


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = chromium_path()
    as_root = hasattr(os, "geteuid") and os.geteuid() == 0
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=executable,
            headless=True,
            # Chromium's sandbox refuses to run as root; everyone else keeps it.
            chromium_sandbox=not as_root,
            args=["--no-sandbox"] if as_root else [],
            timeout=WAIT_MS,
        )
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser, gateway: Gateway) -> Iterator[Page]:
    """A fresh page (own cookies and localStorage) on the gateway's ``/``."""
    context = browser.new_context(base_url=gateway.url)
    context.set_default_timeout(WAIT_MS)
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda exc: errors.append(str(exc)))
    opened.goto("/")
    opened.wait_for_selector("body[data-state=idle]")
    yield opened
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def submit(page: Page, prompt: str, model: str = "", max_tokens: int | None = None) -> None:
    page.fill("#prompt", prompt)
    page.fill("#model", model)
    if max_tokens is not None:
        page.fill("#max-tokens", str(max_tokens))
    page.click("#submit")


def job_of(page: Page) -> str:
    """The id of the job the page shows, once the gateway has accepted it."""
    page.wait_for_function("() => document.body.dataset.job")
    job_id = page.evaluate("() => document.body.dataset.job")
    assert isinstance(job_id, str) and job_id
    return job_id


def wait_state(page: Page, state: str) -> None:
    page.wait_for_selector(f"body[data-state={state}]", timeout=WAIT_MS)


def output(page: Page) -> str:
    text = page.evaluate("() => document.getElementById('output').textContent")
    assert isinstance(text, str)
    return text


def job_text(client: Client, job_id: str) -> str:
    """The job's text read through the Python client (a restart drops what came before)."""
    parts: list[str] = []
    for event in client.subscribe(job_id).events(timeout=30):
        if event.type is EventType.RESTART:
            parts.clear()
        elif event.type is EventType.TOKEN:
            parts.append(event.text)
    return "".join(parts)


def test_tokens_appear_one_by_one(page: Page, client: Client) -> None:
    submit(page, "Alan Turing was", model="mock?delay_ms=60", max_tokens=40)
    lengths: set[int] = set()
    deadline = time.monotonic() + 30
    state = ""
    while time.monotonic() < deadline:
        state, length = page.evaluate(
            "() => [document.body.dataset.state,"
            " document.getElementById('output').textContent.length]"
        )
        if state == "streaming":
            lengths.add(length)
        elif state in ("done", "error", "cancelled"):
            break
        time.sleep(0.03)
    wait_state(page, "done")
    assert page.text_content("#status") == "done (length)"

    job_id = job_of(page)
    text = output(page)
    assert text, "the page showed no text"
    assert text == job_text(client, job_id)
    intermediate = {n for n in lengths if 0 < n < len(text)}
    assert len(intermediate) >= 5, f"the text did not grow token by token: {sorted(lengths)}"
    # Tokens go in as text nodes, never as markup.
    assert page.evaluate("() => document.querySelector('#output *') === null")
    assert page.is_disabled("#cancel")
    assert page.get_attribute(f"#recent button.replay[data-job='{job_id}']", "data-job") == job_id


def test_cancel(page: Page, client: Client) -> None:
    submit(page, "A slow story", model="mock?delay_ms=100", max_tokens=300)
    job_id = job_of(page)
    page.wait_for_function("() => document.getElementById('output').textContent.length > 0")
    assert page.is_enabled("#cancel")
    page.click("#cancel")
    wait_state(page, "cancelled")
    assert "cancelled" in (page.text_content("#status") or "")
    assert page.is_disabled("#cancel")
    events = list(client.subscribe(job_id).events(timeout=30))
    assert events[-1].type is EventType.CANCELLED
    tokens = sum(1 for e in events if e.type is EventType.TOKEN)
    assert 0 < tokens < 300


def test_replay(page: Page, client: Client) -> None:
    submit(page, "First, replay me", model="mock?delay_ms=5", max_tokens=12)
    first = job_of(page)
    wait_state(page, "done")
    submit(page, "Second, a different story", model="mock?delay_ms=5", max_tokens=30)
    page.wait_for_function(f"() => (document.body.dataset.job || '{first}') !== '{first}'")
    wait_state(page, "done")
    second_text = output(page)

    buttons = page.locator("#recent button.replay")
    assert buttons.count() == 2
    assert buttons.nth(0).get_attribute("data-job") != first  # newest first
    page.click(f"#recent button.replay[data-job='{first}']")
    wait_state(page, "done")
    assert page.evaluate("() => document.body.dataset.job") == first
    expected = job_text(client, first)
    assert expected and expected != second_text
    assert output(page) == expected


def test_bad_input_names_the_field(page: Page) -> None:
    submit(page, "", max_tokens=16)
    wait_state(page, "error")
    status = page.text_content("#status") or ""
    assert status.startswith("error:")
    assert "prompt" in status, status
    assert page.locator("#recent li").count() == 0  # nothing was enqueued
    assert page.is_disabled("#cancel")

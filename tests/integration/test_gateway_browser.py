"""The gateway's web page in a real browser: Debian's headless Chromium driven by Playwright for Python (launched with
that executable; Playwright's own browser download is never used), against the session's real mesh.

Outside CI a machine without /usr/bin/chromium skips these tests (`make tools` installs it); in CI (``CI=true``) a
missing browser fails them.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from aimesh.devstack.stack import Stack

# seed 1 streams at least 20 tokens for it (test_cancellation checks), so a stream lasts long enough to watch.
from .test_streaming import PROMPT

if TYPE_CHECKING:
    from playwright.async_api import Browser, Page

CHROMIUM = Path("/usr/bin/chromium")
IN_CI = os.environ.get("CI", "").lower() in ("true", "1")
NO_CHROMIUM = f"{CHROMIUM} is missing (Debian's chromium; `make tools` installs it)"

# Decided at collection, so that a machine without the browser does not start the mesh for nothing.
pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not IN_CI and not CHROMIUM.is_file(), reason=NO_CHROMIUM),
]
# Slow enough to watch: 40 tokens, 50 ms apart.
STREAMED = "max_tokens=40, seed=1, token_delay_ms=50"
STREAM_STATE = """() => ({
  status: document.querySelector('[data-testid="task-status"]').textContent,
  tokens: Number(document.querySelector('[data-testid="token-count"]').textContent),
  output: document.querySelector('[data-testid="task-output"]').textContent,
})"""
TOKENS_WHILE_RUNNING = """(least) => {
  const status = document.querySelector('[data-testid="task-status"]').textContent;
  const tokens = Number(document.querySelector('[data-testid="token-count"]').textContent);
  return status === "RUNNING" && tokens >= least;
}"""


@pytest.fixture(scope="module")
def chromium() -> Path:
    """Debian's Chromium; in CI, where the tests are not skipped without it, its absence fails them."""
    if not CHROMIUM.is_file():
        pytest.fail(f"CI must run the browser test: {NO_CHROMIUM}")
    return CHROMIUM


@pytest.fixture(scope="module")
async def browser(chromium: Path) -> AsyncIterator[Browser]:
    try:
        from playwright.async_api import async_playwright
    except ImportError as e:  # the dev extra pins it: a stale environment
        pytest.fail(f"playwright is not installed (`make setup` installs the dev extra): {e}")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=str(chromium), headless=True)
        yield launched
        await launched.close()


@pytest.fixture
async def page(browser: Browser, mesh: Stack) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport={"width": 1100, "height": 1400})
    opened = await context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    await opened.goto(f"{mesh.gateway_url}/")
    await opened.wait_for_selector("body[data-ready=true]")
    yield opened
    await context.close()
    assert not errors, f"the page's script failed: {errors}"


async def submit(page: Page, model: str, text: str, parameters: str) -> None:
    await page.get_by_label("Model").select_option(model)
    await page.get_by_label("Text").fill(text)
    await page.get_by_label("Parameters").fill(parameters)
    await page.get_by_role("button", name="Submit").click()


async def gateway_state(mesh: Stack, task_id: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=mesh.gateway_url, timeout=30) as http:
        response = await http.get(f"/v1/tasks/{task_id}")
    assert response.status_code == 200, response.text
    state: dict[str, Any] = response.json()["state"]
    return state


def final_text(state: dict[str, Any]) -> str:
    return "".join(s for t in state["result"]["output"]["tensors"] for s in t.get("stringData", []))


async def test_the_page_streams_a_generate_tasks_tokens_and_shows_its_end(
    page: Page, mesh: Stack, tmp_path: Path
) -> None:
    from playwright.async_api import expect

    await submit(page, "generate", PROMPT, STREAMED)

    await page.wait_for_function(TOKENS_WHILE_RUNNING, arg=3, timeout=30_000)
    streaming = await page.evaluate(STREAM_STATE)
    status = page.get_by_test_id("task-status")
    await expect(status).to_have_text("SUCCEEDED", timeout=60_000)
    ended = await page.evaluate(STREAM_STATE)
    task_id = await page.get_by_test_id("task-id").text_content()
    assert task_id

    screenshot = tmp_path / "gateway-page.png"
    await page.screenshot(path=str(screenshot), full_page=True)
    print(f"screenshot: {screenshot}")
    assert screenshot.stat().st_size > 0

    assert streaming["output"] and ended["output"].startswith(streaming["output"]), (streaming, ended)
    assert ended["tokens"] > streaming["tokens"] >= 3, "tokens did not arrive one update after another"
    assert ended["output"] == final_text(await gateway_state(mesh, task_id))
    for timing in ("timing-accepted", "timing-first-update", "timing-end"):
        await expect(page.get_by_test_id(timing)).to_have_text(re.compile(r"^\d+ ms"))
    await expect(page.get_by_test_id("task-history").locator("li").last).to_have_text(re.compile("^SUCCEEDED"))
    row = page.locator(f'[data-testid="task-row"][data-task-id="{task_id}"]')
    await expect(row).to_have_attribute("data-status", "SUCCEEDED")


async def test_the_page_cancels_a_running_task(page: Page) -> None:
    from playwright.async_api import expect

    await submit(page, "generate", PROMPT, "max_tokens=200, seed=1, token_delay_ms=100")
    await page.wait_for_function(TOKENS_WHILE_RUNNING, arg=2, timeout=30_000)

    await page.get_by_role("button", name="Cancel task").click()

    await expect(page.get_by_test_id("task-status")).to_have_text("CANCELLED", timeout=30_000)
    await expect(page.get_by_test_id("task-error")).to_contain_text("cancelled by the client")
    await expect(page.get_by_test_id("task-output")).not_to_be_empty()
    await expect(page.get_by_role("button", name="Cancel task")).to_be_disabled()


async def test_the_page_shows_a_refused_tasks_problem_with_its_violations(page: Page) -> None:
    from playwright.async_api import expect

    await submit(page, "generate", PROMPT, "max_tokens=100000")

    error = page.get_by_test_id("error")
    await expect(error).to_be_visible()
    await expect(error).to_contain_text("400")
    await expect(error.get_by_test_id("violations")).to_contain_text("max_tokens")
    await expect(page.get_by_test_id("tasks-empty")).to_be_visible()  # nothing was accepted


async def test_the_page_lists_every_task_of_the_tab_and_shows_output_as_text_never_markup(page: Page) -> None:
    from playwright.async_api import expect

    markup = '<b id="injected">bold</b><img src="x" onerror="window.injected = true">'
    await submit(page, "sleep", markup, "delay_ms=0")
    await expect(page.get_by_test_id("task-status")).to_have_text("SUCCEEDED", timeout=60_000)
    await submit(page, "sentiment", "What a great day", "")
    await expect(page.get_by_test_id("task-status")).to_have_text("SUCCEEDED", timeout=60_000)

    await expect(page.get_by_test_id("task-row")).to_have_count(2)
    await page.get_by_test_id("task-row").last.get_by_role("button").click()  # the first task, listed last
    await expect(page.get_by_test_id("task-output")).to_have_text(markup)
    assert await page.locator("#injected").count() == 0
    assert await page.evaluate("() => window.injected") is None

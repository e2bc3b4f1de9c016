"""Real-browser check: `streamlit run app.py` headless, driven by Debian's Chromium through Playwright.

Generates on the embedded default model, checks that tokens and charts render with no exception box,
stops a long run mid-way, and saves a screenshot of each page under docs/ for the README.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [pytest.mark.browser, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(default_model):
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(ROOT / "app.py"),
        "--server.headless",
        "true",
        "--server.port",
        str(port),
        "--server.address",
        "127.0.0.1",
        "--browser.gatherUsageStats",
        "false",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(url + "/_stcore/health", timeout=1)
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("streamlit did not start: " + proc.stdout.read().decode(errors="replace")[-2000:])
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def page(server):
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (make install-dev installs it)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        pg = browser.new_page(viewport={"width": 1500, "height": 2000})
        pg.set_default_timeout(120_000)
        pg.goto(server)
        pg.get_by_role("button", name="Generate").wait_for()
        yield pg
        browser.close()


def no_exception(pg) -> None:
    assert pg.locator("[data-testid='stException']").count() == 0


def wait_idle(pg) -> None:
    pg.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=120_000)
    pg.wait_for_timeout(800)


def set_number(pg, label: str, value: int) -> None:
    box = pg.get_by_label(label, exact=True)
    box.fill(str(value))
    box.press("Enter")
    wait_idle(pg)


def test_generate_renders_tokens_and_charts(page):
    DOCS.mkdir(exist_ok=True)
    page.locator(".st-key-gen_generate button").first.click()
    page.get_by_text("Inspect a step").wait_for(timeout=180_000)
    wait_idle(page)
    no_exception(page)
    assert page.locator("[data-testid='stVegaLiteChart']").count() >= 3
    assert page.locator("span[title^='step 0:']").count() == 1  # the token stream
    page.screenshot(path=str(DOCS / "generate.png"), full_page=True)


def test_stop_keeps_partial_trace(page):
    page.get_by_text("Length and stopping").click()
    set_number(page, "max new tokens", 400)
    set_number(page, "min new tokens", 400)
    page.locator(".st-key-gen_generate button").first.click()
    page.get_by_text("tokens/s").first.wait_for(timeout=60_000)
    page.wait_for_timeout(1500)
    page.locator(".st-key-gen_stop button").first.click()
    page.get_by_text("Run stopped early").wait_for(timeout=60_000)
    wait_idle(page)
    no_exception(page)
    set_number(page, "min new tokens", 0)
    set_number(page, "max new tokens", 60)


def test_viewer_heads_and_compare_pages(page, server):
    page.get_by_role("link", name="Trace viewer").click()
    page.get_by_text("Inspect a step").wait_for()
    wait_idle(page)
    no_exception(page)
    page.screenshot(path=str(DOCS / "viewer.png"), full_page=True)
    page.get_by_role("link", name="Heads").click()
    page.get_by_text("Attention heads").first.wait_for()
    wait_idle(page)
    no_exception(page)
    assert page.locator("[data-testid='stVegaLiteChart']").count() == 2
    page.screenshot(path=str(DOCS / "heads.png"), full_page=True)
    page.get_by_role("link", name="Compare models").click()
    page.locator(".st-key-compare_go button").first.click()
    page.get_by_text("Run B", exact=True).wait_for(timeout=180_000)
    wait_idle(page)
    no_exception(page)
    page.screenshot(path=str(DOCS / "compare.png"), full_page=True)


def test_beyond_the_basics_screenshots(page, tmp_path):
    """Which rule, logit lens, a branch, the replay check and the HTML export, on a shipped example."""
    page.get_by_role("link", name="Trace viewer").click()
    page.get_by_text("Inspect a step").wait_for()
    page.locator(".st-key-viewer_example").click()
    page.get_by_role("option", name="sky-sampled").click()
    wait_idle(page)
    tabs = page.locator("[data-testid='stTabs']").first
    page.get_by_role("tab", name="Which rule?").click()
    page.get_by_text("what each rule did to it").wait_for()
    wait_idle(page)
    tabs.screenshot(path=str(DOCS / "rules.png"))
    page.get_by_role("tab", name="Logit lens").click()
    wait_idle(page)
    assert page.locator("[data-testid='stTabs'] [data-testid='stVegaLiteChart']").count() >= 2
    tabs.screenshot(path=str(DOCS / "lens.png"))
    page.get_by_role("tab", name="Branch from here").click()
    page.get_by_role("button", name="Continue from here").click()
    page.get_by_text("Branch 1 splits from the main run").wait_for(timeout=180_000)
    wait_idle(page)
    no_exception(page)
    page.get_by_text("Branch 1 splits from the main run").scroll_into_view_if_needed()
    page.screenshot(path=str(DOCS / "branch.png"))
    page.get_by_text("Replay check: re-score these tokens").click()
    page.locator(".st-key-viewer_replay button").first.click()
    page.get_by_text(re.compile("^(faithful|close|different):")).wait_for(timeout=180_000)
    wait_idle(page)
    no_exception(page)
    page.locator("[data-testid='stExpander']").last.screenshot(path=str(DOCS / "replay.png"))
    from explorer_core import tracefile
    from explorer_core.export_html import build

    trace, attn = tracefile.load(ROOT / "examples" / "sky-sampled" / "trace.json")
    html_path = tmp_path / "trace.html"
    html_path.write_text(build(trace, attn), encoding="utf-8")
    other = page.context.browser.new_page(viewport={"width": 1300, "height": 1000})
    other.goto(html_path.as_uri())
    other.locator("#topk svg").wait_for()
    other.locator(".tok").nth(5).click()
    other.locator("#attn svg").wait_for()
    other.wait_for_timeout(500)
    other.screenshot(path=str(DOCS / "html_export.png"), full_page=True)
    other.close()

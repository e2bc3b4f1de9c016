"""Real-browser check: `streamlit run app.py` headless, driven by Debian's Chromium through Playwright.

Generates on the embedded default model, checks that tokens and charts render with no exception box and
no chart wider than its container, that the raw top-k axis labels every candidate, that downloads all
arrive, that the HTML export downloaded from the app draws every chart; clicks a torn step and sees the
branch form open there; explains a step against two contrast tokens; stops a long run mid-way, and saves a
screenshot of each page: into docs/ for the README with `make screenshots` (EXPLORER_SHOTS=docs), else into a
temporary folder, so a test run leaves the repository's files as they were.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

import pytest

from tools.appserver import streamlit_app

ROOT = Path(__file__).resolve().parents[1]
DOCS = (
    ROOT / os.environ["EXPLORER_SHOTS"] if os.environ.get("EXPLORER_SHOTS") else Path(tempfile.mkdtemp(prefix="shots-"))
)
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(default_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "streamlit.log"
    try:
        with streamlit_app(log, {"HF_HUB_OFFLINE": "1"}, wait_s=60) as (url, _):
            yield url
    except RuntimeError as exc:
        pytest.fail(str(exc))


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
        # 1400 px wide like a common laptop; tall, so full-page screenshots hold the whole page
        pg = browser.new_page(viewport={"width": 1400, "height": 2000}, accept_downloads=True)
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


# Each visible Vega chart: its title, drawn size, the width its container gives it, and the axis
# labels Vega drew visibly (it hides overlapping ones with opacity 0).
CHART_BOXES = """() => Array.from(document.querySelectorAll("[data-testid='stVegaLiteChart']"))
  .filter(e => e.offsetParent !== null)
  .map(e => {
    const g = e.querySelector('svg, canvas'); const r = g ? g.getBoundingClientRect() : {width: 0, height: 0};
    const block = e.closest("[data-testid='stVerticalBlock']") || e.parentElement;
    // Streamlit draws a chart's own title outside the SVG: facet headers and axis titles identify it
    const titles = Array.from(e.querySelectorAll('.role-title-text, .role-axis-title')).map(t => t.textContent);
    const labels = Array.from(e.querySelectorAll('.role-axis-label text'))
      .filter(t => getComputedStyle(t).opacity !== '0' && t.getAttribute('opacity') !== '0').map(t => t.textContent);
    return {titles, w: r.width, h: r.height, canvas: !!g && g.tagName === 'CANVAS',
            room: block.getBoundingClientRect().width, marks: e.querySelectorAll('.mark-rect path, .mark-line path, .mark-symbol path, .mark-text text, .mark-rule line, .mark-rect rect').length, labels};
  })"""


def charts_fit(pg) -> list[dict]:
    """Every visible chart has a finite size, marks, and fits its container (nothing clipped)."""
    boxes = pg.evaluate(CHART_BOXES)
    assert boxes
    for box in boxes:
        assert 0 < box["w"] < 5000 and 0 < box["h"] < 5000, box
        assert box["marks"] > 0 or box["canvas"], box  # Streamlit draws big charts on a canvas: no marks in the DOM
        assert box["w"] <= box["room"] + 1, f"chart {box['titles']!r} is {box['w']:.0f} px in {box['room']:.0f} px"
    return boxes


def topk_labels_complete(pg, step) -> None:
    """The top-k chart labels every candidate of both lists (the chosen token included)."""
    expected = sum(len(c["ids"]) + (step["token_id"] not in c["ids"]) for c in (step["top_raw"], step["top_proc"]))
    tops = [b for b in pg.evaluate(CHART_BOXES) if any(t.startswith("Top candidates: ") for t in b["titles"])][:2]
    assert len(tops) == 2  # raw and processed, a chart each
    labels = tops[0]["labels"] + tops[1]["labels"]
    ticks = [t for t in labels if not re.fullmatch(r"[01]\.\d", t)]  # the probability axes: 0.0 to 1.0
    assert len(ticks) == expected, (ticks, expected)


def download(pg, button_key: str, folder: Path) -> Path:
    with pg.expect_download(timeout=60_000) as info:
        pg.locator(f".st-key-{button_key} button").first.click()
    path = folder / info.value.suggested_filename
    info.value.save_as(path)
    return path


def test_generate_renders_tokens_and_charts(page, tmp_path):
    DOCS.mkdir(exist_ok=True)
    page.locator(".st-key-gen_generate button").first.click()
    page.get_by_text("Inspect a step").wait_for(timeout=180_000)
    wait_idle(page)
    no_exception(page)
    assert page.locator("[data-testid='stVegaLiteChart']").count() >= 3
    page.locator("span[title^='step 0:']").first.wait_for()  # the stream component fills itself once mounted
    assert page.locator("span[title^='step 0:']").count() == 1  # the token stream
    charts_fit(page)
    page.screenshot(path=str(DOCS / "generate.png"), full_page=True)
    # three quick downloads in a row all arrive (a rerun per click once lost the later files)
    paths = [download(page, k, tmp_path) for k in ("gen_dl_json", "gen_dl_txt", "gen_dl_zip")]
    assert [p.name for p in paths] == ["trace.json", "output.txt", "trace.zip"]
    assert "trace.attn.safetensors" in zipfile.ZipFile(paths[2]).namelist()
    import json

    topk_labels_complete(page, json.loads(paths[0].read_text())["steps"][0])


def torn_pills(pg, key: str) -> dict[int, object]:
    """The torn steps' pills under the token stream, by step ("16 · ␣tiny" is step 16's)."""
    pills = pg.locator(f".st-key-{key}_torn button[role='radio']")
    return {int(pills.nth(i).inner_text().split(" · ")[0]): pills.nth(i) for i in range(pills.count())}


def click_torn_step(pg, key: str, step: int | None = None) -> int:
    """Click a torn step's pill (the second one unless told) and check that the step inspector moved to it
    and 'Branch from here' opened there."""
    pills = torn_pills(pg, key)
    assert len(pills) >= 2, pills
    step = list(pills)[1] if step is None else step
    pills[step].click()
    pg.get_by_text(f"Branch from step {step} of the main run").wait_for()
    wait_idle(pg)
    no_exception(pg)
    assert pg.get_by_role("tab", name="Branch from here").get_attribute("aria-selected") == "true"
    assert pg.locator(f".st-key-{key}_step [data-testid='stSliderThumbValue']").inner_text() == str(step)
    assert pills[step].get_attribute("aria-checked") == "true", "the inspected step's pill is lit"
    return step


def test_fidelity_check_is_shown_with_the_run(page):
    """Under the run's summary: what the model's fidelity check compared at load, and where rows come from."""
    page.get_by_text("Fidelity check: every number shown is the model's own").first.click()
    box = page.locator("[data-testid='stExpander']").filter(has_text="Fidelity check").first
    box.get_by_text("Recorded attention comes from a fast copy proven equal to it").wait_for()
    box.locator("[data-testid='stDataFrame']").wait_for()
    no_exception(page)
    box.scroll_into_view_if_needed()
    box.screenshot(path=str(DOCS / "fidelity.png"))
    page.get_by_text("Fidelity check: every number shown is the model's own").first.click()  # closed again


def test_torn_step_opens_the_branch_form(page):
    """Generate page: a click on a torn step under the stream inspects it and opens the branch form there."""
    click_torn_step(page, "gen")


def test_clicking_a_token_inspects_its_step(page):
    """Generate page: a click on a token of the stream moves the step inspector to it, as in the export."""
    for step in (3, 1):
        page.locator(f"span.tok[data-step='{step}']").first.click()
        wait_idle(page)
        no_exception(page)
        assert page.locator(".st-key-gen_step [data-testid='stSliderThumbValue']").inner_text() == str(step)
        page.get_by_text(f"Step {step} chose this token").wait_for(state="attached")  # its tab may be closed


def test_what_if_ablation_and_sweep(page, tmp_path):
    """What if? on the default run: zero the last MLP at the inspected step (measured beside predicted), then
    sweep every head and MLP; the kept sweep's two heatmaps draw in the one-file export downloaded from the app."""
    page.get_by_role("tab", name="What if?").click()
    panel = page.get_by_role("tabpanel").filter(has_text="What if a part of the model")
    panel.get_by_role("button", name="Measure").click()
    panel.get_by_text("After (measured)").wait_for(timeout=180_000)
    wait_idle(page)
    no_exception(page)
    assert panel.locator("[data-testid='stMetric']").count() == 4
    panel.get_by_text("the final norm's rescaling").wait_for()
    page.locator(".st-key-gen_whatif_effect").screenshot(path=str(DOCS / "whatif.png"))
    panel.get_by_role("button", name="Sweep: change each part alone").click()
    panel.get_by_text("Correlation of measured and predicted").wait_for(timeout=300_000)
    wait_idle(page)
    no_exception(page)
    charts_fit(page)
    panel.get_by_text("Measured: part changed").wait_for()
    panel.get_by_text("Predicted: direct share").wait_for()
    sweep = page.locator(".st-key-gen_whatif_sweep")
    sweep.scroll_into_view_if_needed()
    sweep.screenshot(path=str(DOCS / "whatif_sweep.png"))
    panel.get_by_role("button", name="Keep this sweep in the trace (saved with it)").click()
    panel.get_by_role("button", name="Keep this sweep in the trace (saved with it)").wait_for(state="detached")
    wait_idle(page)
    no_exception(page)
    other = page.context.browser.new_page(viewport={"width": 1400, "height": 1000})
    other.goto(download(page, "gen_dl_html", tmp_path).as_uri())
    for box in ("#sweep0m", "#sweep0p"):
        other.locator(f"{box} svg").wait_for()
        assert other.locator(f"{box} svg .mark-rect path").count() > 200  # 270 heads and 30 MLPs
    other.close()


# Each chart title Vega drew as SVG text: how far it sits inside its chart's drawing (negative: clipped).
TITLES_INSIDE = """() => Array.from(document.querySelectorAll("[data-testid='stVegaLiteChart']"))
  .filter(e => e.offsetParent !== null)
  .flatMap(e => { const svg = e.querySelector('svg'); if (!svg) return [];
    const box = e.getBoundingClientRect();
    return Array.from(svg.querySelectorAll('.role-title-text')).map(t => { const r = t.getBoundingClientRect();
      return {text: t.textContent, left: r.left - box.left, right: box.right - r.right}; }); })"""


def titles_inside(pg) -> list[dict]:
    titles = pg.evaluate(TITLES_INSIDE)
    for t in titles:
        assert t["left"] >= -1 and t["right"] >= -1 and not t["text"].endswith("…"), t
    return titles


def explained_line(pg) -> str:
    line = pg.locator("[data-testid='stText']").filter(has_text="logit difference")
    return line.first.inner_text() if line.count() else ""


def attribution_scores(pg) -> list[str]:
    """The shaded stream's scores, as its tooltips show them."""
    spans = pg.locator(".st-key-gen_explain_inputs span[title^='position ']")
    return [spans.nth(i).get_attribute("title").rsplit("score ", 1)[1] for i in range(spans.count())]


def press_explain(pg, before: str) -> str:
    pg.get_by_role("button", name="Explain", exact=True).click()
    pg.wait_for_function(
        """before => Array.from(document.querySelectorAll("[data-testid='stText']"))
            .some(e => e.textContent.includes('logit difference') && e.textContent !== before)""",
        arg=before,
        timeout=300_000,
    )
    wait_idle(pg)
    no_exception(pg)
    return explained_line(pg)


def test_explain_screenshots(page):
    """'Why this token?' on a torn step of the default run: the shaded stream and top positions, the heads x
    layers breakdown; another contrast token gives other numbers."""
    step = min(torn_pills(page, "gen"))
    click_torn_step(page, "gen", step)
    page.get_by_role("tab", name="Why this token?").click()
    first = press_explain(page, "")
    assert first.startswith(f"Step {step}:"), first
    scores = attribution_scores(page)
    assert scores and any(float(v) != 0 for v in scores)
    # every bar of the top positions is named (none hidden for overlapping its neighbour)
    bars = [b for b in charts_fit(page) if "score" in b["titles"]]
    assert bars and len([t for t in bars[0]["labels"] if ": " in t]) == min(15, len(scores)), bars
    inputs = page.locator(".st-key-gen_explain_inputs")
    inputs.scroll_into_view_if_needed()
    inputs.screenshot(path=str(DOCS / "explain.png"))
    page.locator(".st-key-gen_explain_components").screenshot(path=str(DOCS / "explain_components.png"))
    pick = page.locator(".st-key-gen_explain_pick")
    pick.scroll_into_view_if_needed()  # a click that has to scroll first left the list closed
    page.wait_for_timeout(500)
    pick.click()
    page.get_by_role("option").nth(1).click()  # the best other candidate is picked by default: take the next
    second = press_explain(page, first)
    # another contrast: another logit difference, other scores on the same positions
    assert second.split(" over ")[1] != first.split(" over ")[1], (first, second)
    number = re.compile(r"logit difference (-?[\d.]+)")
    assert number.search(first)[1] != number.search(second)[1], (first, second)
    again = attribution_scores(page)
    assert len(again) == len(scores) and again != scores


def test_out_of_range_number_is_refused_in_words(page):
    page.get_by_text("Length and stopping").click()
    set_number(page, "max new tokens", 100000)
    page.get_by_text("max_new_tokens=100000 is out of range").wait_for()
    assert page.locator(".st-key-gen_generate button").first.is_disabled()
    set_number(page, "max new tokens", 60)
    assert page.locator(".st-key-gen_generate button").first.is_enabled()


def test_stop_keeps_partial_trace(page):
    set_number(page, "max new tokens", 400)
    set_number(page, "min new tokens", 400)
    page.locator(".st-key-gen_generate button").first.click()
    page.get_by_text("/ 400 tokens").first.wait_for(timeout=60_000)  # the live progress: tokens are coming
    # the toolbar's own Stop (which left a frozen page) is hidden; the app's Stop is the one to use
    status = page.locator("[data-testid='stStatusWidget']")
    if status.count():
        assert status.locator("button:visible").count() == 0
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
    charts_fit(page)
    page.screenshot(path=str(DOCS / "viewer.png"), full_page=True)
    page.get_by_role("link", name="Heads").click()
    page.get_by_text("Attention heads").first.wait_for()
    page.locator("[data-testid='stVegaLiteChart']").nth(1).wait_for(timeout=60_000)
    wait_idle(page)
    no_exception(page)
    assert page.locator("[data-testid='stVegaLiteChart']").count() == 2
    charts_fit(page)
    page.screenshot(path=str(DOCS / "heads.png"), full_page=True)
    page.get_by_role("link", name="Compare models").click()
    page.get_by_text("Compare two runs").first.wait_for()
    wait_idle(page)
    page.locator(".st-key-compare_go button").first.click()
    page.get_by_text("Run B", exact=True).wait_for(timeout=180_000)
    wait_idle(page)
    no_exception(page)
    charts_fit(page)  # half-width columns: top-k panels stacked, timelines narrow
    titles = " ".join(t["text"] for t in titles_inside(page))  # run B's heatmap title too: whole, inside
    assert titles.count("Attention of the sequence seen") == 2, titles  # run A's heatmap and run B's
    page.get_by_text("The two distributions are identical at every step").wait_for()  # same settings: no noise
    page.screenshot(path=str(DOCS / "compare.png"), full_page=True)
    page.goto(server + "/heads")  # a deep link keeps the frame: page links and the sidebar
    page.get_by_text("Attention heads").first.wait_for()
    page.get_by_role("link", name="Trace viewer").wait_for()
    page.get_by_text("Sampling").first.wait_for()


def test_beyond_the_basics_screenshots(page, tmp_path):
    """Which rule, logit lens, a branch from a torn step, the replay check and the HTML export, on a shipped
    example."""
    page.get_by_role("link", name="Trace viewer").click()
    page.get_by_text("Inspect a step").wait_for()
    page.locator(".st-key-viewer_example").click()
    page.get_by_role("option", name="sky-sampled").click()
    wait_idle(page)
    tabs = page.locator("[data-testid='stTabs']").first
    page.get_by_role("tab", name="Which rule?").click()
    page.get_by_text("what each rule did to it").wait_for()
    wait_idle(page)
    stage = [b for b in charts_fit(page) if "after stage" in b["titles"]]  # the stage chart's legend included
    assert stage and {"0.0", "0.2", "0.4", "0.6", "0.8", "1.0"} <= set(stage[0]["labels"]), stage  # a plot, not a strip
    tabs.screenshot(path=str(DOCS / "rules.png"))
    page.get_by_role("tab", name="Logit lens").click()
    wait_idle(page)
    assert page.locator("[data-testid='stTabs'] [data-testid='stVegaLiteChart']").count() >= 2
    tabs.screenshot(path=str(DOCS / "lens.png"))
    step = click_torn_step(page, "viewer")  # a torn step's pill opens "Branch from here" at that step
    page.get_by_role("button", name="Continue from here").click()
    page.get_by_text(f"Branch 1 splits from the main run at step {step}").wait_for(timeout=180_000)
    wait_idle(page)
    no_exception(page)
    # the tab the user was on stays open after the branch
    assert page.get_by_role("tab", name="Branch from here").get_attribute("aria-selected") == "true"
    page.get_by_text("Branch 1 splits from the main run").scroll_into_view_if_needed()
    page.screenshot(path=str(DOCS / "branch.png"))
    page.get_by_text("Replay check: re-score these tokens").click()
    page.locator(".st-key-viewer_replay button").first.click()
    page.get_by_text(re.compile("^(faithful|close|different):")).wait_for(timeout=180_000)
    wait_idle(page)
    no_exception(page)
    replay = page.locator("[data-testid='stExpander']").filter(has_text="Replay check: re-score")
    boxes = [b for b in charts_fit(page) if "largest |recorded - recomputed|" in b["titles"]]
    assert boxes and boxes[0]["h"] > 250, boxes  # the 200 px plot plus its axis: not squashed to a strip
    replay.screenshot(path=str(DOCS / "replay.png"))
    check_html_export(page, tmp_path)


def check_html_export(page, tmp_path) -> None:
    """The single-file HTML downloaded from the app (with its branch) draws every chart, with marks."""
    html_path = download(page, "viewer_dl_html", tmp_path)
    other = page.context.browser.new_page(viewport={"width": 1400, "height": 1000})
    other.goto(html_path.as_uri())
    other.locator("#timeline svg").wait_for()
    other.locator("#topk svg").wait_for()
    other.locator("#attn svg").wait_for()
    assert other.locator(".tok[data-path='1']").count() > 0  # the branch is in the file
    other.locator(".tok").nth(5).click()
    other.wait_for_timeout(500)
    sizes = other.evaluate(
        """() => ['#timeline', '#topk', '#attn'].map(id => {
            const svg = document.querySelector(id + ' svg'); const r = svg.getBoundingClientRect();
            return {id, w: r.width, h: r.height,
                    marks: svg.querySelectorAll('.mark-line path, .mark-symbol path, .mark-rect path, .mark-text text').length};
        })"""
    )
    for box in sizes:
        assert 0 < box["w"] < 5000 and 0 < box["h"] < 5000 and box["marks"] > 0, box
    other.screenshot(path=str(DOCS / "html_export.png"), full_page=True)
    other.locator(".tok[data-path='1']").first.click()
    other.get_by_text("Branches record no attention").wait_for()
    other.close()


def test_long_prompt_trace_in_the_viewer(page, default_model, tmp_path):
    """A 2,000-token prompt's trace, saved as the CLI saves it and opened from "Saved runs": the attention
    tab draws bounded charts that fit, and its screenshot goes to the README."""
    from bench.longctx import prompt_text
    from explorer_core import tracefile
    from explorer_core.config import GenerationConfig
    from explorer_core.stepper import Run

    cfg = GenerationConfig(
        prompt=prompt_text(default_model.tokenizer, 2000), chat=False, max_new_tokens=6, min_new_tokens=6
    )
    run = Run(default_model, cfg)
    for _ in run:
        pass
    tracefile.save(run.trace(), run.attention(), tmp_path / "long" / "trace.json")
    page.get_by_role("link", name="Trace viewer").click()
    page.get_by_text("Saved runs").first.click()
    box = page.get_by_label("Folder of saved runs")
    box.fill(str(tmp_path))
    box.press("Enter")
    page.get_by_text("Inspect a step").wait_for(timeout=60_000)
    page.get_by_role("tab", name="Attention").click()
    # the step is whichever the viewer was on (a torn step earlier): any step's query row will do
    page.get_by_text(re.compile(r"Where step \d+'s query looked")).first.wait_for(timeout=60_000)
    wait_idle(page)
    no_exception(page)
    boxes = charts_fit(page)
    assert any("query position" in b["titles"] for b in boxes) and any("attention mass" in b["titles"] for b in boxes)
    page.get_by_role("tabpanel").screenshot(path=str(DOCS / "long_prompt.png"))


def new_page(page, server: str, width: int, height: int, path: str = ""):
    pg = page.context.browser.new_page(viewport={"width": width, "height": height}, accept_downloads=True)
    pg.set_default_timeout(120_000)
    pg.goto(server.rstrip("/") + "/" + path.lstrip("/"))
    return pg


def test_phone_width_fits_without_sideways_scrolling(page, server):
    """A 390 × 844 phone: a run, its charts and the attention heatmap fit the screen (no sideways scroll)
    and the heatmap stays square-ish (it once collapsed to a 2 px strip)."""
    phone = new_page(page, server, 390, 844, "?max_new_tokens=12&min_new_tokens=12")
    try:
        phone.locator(".st-key-gen_generate button").first.click()
        phone.get_by_text("Inspect a step").wait_for(timeout=180_000)
        wait_idle(phone)
        no_exception(phone)
        charts_fit(phone)
        phone.get_by_role("tab", name="Attention").click()
        wait_idle(phone)
        heat = [b for b in charts_fit(phone) if b["h"] > 60 and b["w"] > 60]
        assert heat, "the attention heatmap is drawn"
        assert all(0.4 <= b["h"] / b["w"] <= 2.5 for b in heat), heat
        wide = phone.evaluate("() => document.scrollingElement.scrollWidth")
        assert wide <= 391, f"the page is {wide} px wide on a 390 px screen"
        phone.locator("[data-testid='stVegaLiteChart']:visible").last.scroll_into_view_if_needed()
        phone.wait_for_timeout(500)
        phone.screenshot(path=str(DOCS / "phone.png"), full_page=False)
    finally:
        phone.close()


def test_reload_keeps_settings_and_the_run(page, server):
    """Settings live in the URL (a reload, or the link shared, brings them back); a finished run is in the
    viewer's Recent runs after a reload; reloading during a run asks first."""
    pg = new_page(page, server, 1400, 1400)
    try:
        pg.get_by_role("button", name="Generate").wait_for()
        pg.get_by_text("Length and stopping").click()  # the expander holding the length settings
        set_number(pg, "max new tokens", 9)
        assert "max_new_tokens=9" in pg.url
        pg.locator(".st-key-gen_generate button").first.click()
        pg.get_by_text("Inspect a step").wait_for(timeout=180_000)
        wait_idle(pg)
        pg.reload()
        pg.get_by_role("button", name="Generate").wait_for()
        wait_idle(pg)
        assert pg.get_by_label("max new tokens", exact=True).input_value() == "9"
        pg.goto(server.rstrip("/") + "/viewer?source=recent")
        pg.locator(".st-key-viewer_recent").wait_for()
        wait_idle(pg)
        no_exception(pg)
        assert pg.locator("[data-testid='stVegaLiteChart']").count() >= 1  # the recent run is drawn
        pg.screenshot(path=str(DOCS / "recent_runs.png"), full_page=False)
        # a long run, then a reload while it goes: the browser asks before leaving
        pg.goto(server.rstrip("/") + "/?max_new_tokens=400&min_new_tokens=400")
        pg.locator(".st-key-gen_generate button").first.click()
        pg.locator(".explorer-running").wait_for(state="attached", timeout=60_000)
        asked = []
        pg.on("dialog", lambda d: (asked.append(d.type), d.accept()))
        pg.reload()
        pg.get_by_role("button", name="Generate").wait_for()
        assert asked == ["beforeunload"], asked
    finally:
        pg.close()

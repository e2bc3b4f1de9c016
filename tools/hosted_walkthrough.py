"""A new user's walk through the app in hosted mode, with the server's memory measured all along.

Starts `streamlit run app.py` with `EXPLORER_HOSTED=1` (headless, a free port) and drives Debian's
Chromium through Playwright as a visitor would: a prompt of 1,000 to 1,024 tokens of the default model
(the hosted prompt limit is 1,024), attention recording and the logit lens on, Generate; the trace.zip
downloaded and uploaded again on the Trace viewer; there, every tab of the step inspector (the prompt's
own heatmap at step 0, another layer and head, 512 cells per axis, the whole sequence at the last
step), a branch, an explanation, the replay check and the single-file HTML export; then the Heads page
and the Compare page (which runs its own two generations from the sidebar's settings).

A sampler thread reads the server's VmRSS (the streamlit process and any children) every 0.2 s. One
row per action: seconds, RSS after it, the highest RSS sampled during it, and the kernel's peak
(VmHWM) so far. Exit status 1 when anything the user did failed: an exception box, an error alert or a
"Cannot …"/"Could not …" line on the page. A screenshot after each action (the page, or the view it opened) goes to --out.

    python -m tools.hosted_walkthrough [--out DIR] [--new-tokens 128] [--ig-steps N] [--write]

`--write` puts the table into RELIABILITY.md's "Hosted walkthrough" section (tools/mdsections.py).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tools.appserver import streamlit_app

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CLOUD_MB = 2.7e9 / 2**20  # Community Cloud's upper memory figure (its docs: 690 MB to 2.7 GB), read as 2.7e9 bytes
SECTION = "Hosted walkthrough"
LONG = 900_000  # ms: a model job on 2 cores at 1,000 tokens can take minutes


# -- the server and its memory -------------------------------------------------------------------
def server(log: Path):
    """`streamlit run app.py` in hosted mode; yields (url, pid). Its output goes to `log`."""
    env = dict(
        EXPLORER_HOSTED="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        # the error text itself, for the report (a hosted visitor sees a short message instead)
        STREAMLIT_CLIENT_SHOW_ERROR_DETAILS="full",
    )
    return streamlit_app(log, env, wait_s=120)


def _status_kb(pid: int, field_: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next((int(line.split()[1]) for line in fh if line.startswith(field_ + ":")), 0)
    except OSError:  # the process ended between listing and reading
        return 0


def tree(pid: int) -> list[int]:
    """`pid` and every process below it (streamlit runs in one process; a helper may fork)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    parents[int(entry)] = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, frontier = [pid], [pid]
    while frontier:
        frontier = [p for p, pp in parents.items() if pp in frontier]
        out += frontier
    return out


class Memory:
    """Samples the server tree's RSS in a thread; windows of samples belong to actions."""

    def __init__(self, pid: int, every_s: float = 0.2) -> None:
        self.pid, self.every = pid, every_s
        self.samples: list[float] = []  # MiB
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def rss(self) -> float:
        return sum(_status_kb(p, "VmRSS") for p in tree(self.pid)) / 1024

    def hwm(self) -> float:
        """The kernel's peak RSS of each process in the tree, added (one process in practice)."""
        return sum(_status_kb(p, "VmHWM") for p in tree(self.pid)) / 1024

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.samples.append(self.rss())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# -- the page ------------------------------------------------------------------------------------
ERRORS_JS = """() => {
  const text = sel => Array.from(document.querySelectorAll(sel)).map(e => e.innerText.trim()).filter(t => t);
  const lines = text("[data-testid='stText'], [data-testid='stCaptionContainer']")
    .filter(t => /^(Cannot|Could not)\\b/.test(t));
  return {exceptions: text("[data-testid='stException']"), errors: text("[data-testid='stAlertContentError']"),
          cannot: lines, warnings: text("[data-testid='stAlertContentWarning']")};
}"""


@dataclass
class Row:
    action: str
    seconds: float
    rss_mb: float
    during_mb: float
    hwm_mb: float
    problems: list[str] = field(default_factory=list)


class Walk:
    """The browser page, the memory sampler and the rows of the table, one per action."""

    def __init__(self, page, memory: Memory, out: Path) -> None:
        self.page, self.memory, self.out = page, memory, out
        self.rows: list[Row] = []
        self.warnings: set[str] = set()

    @contextlib.contextmanager
    def action(self, name: str, shot=None):
        """Time one action and check the page after it; `shot` gives the locator to photograph (default:
        the page; a view below the first 2,000 px is photographed as its own element)."""
        first = len(self.memory.samples)
        start = time.perf_counter()
        problems: list[str] = []
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - a step that times out or cannot click is a failed action
            problems.append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        seconds = time.perf_counter() - start
        found = self.page.evaluate(ERRORS_JS)
        problems += found["exceptions"] + found["errors"] + found["cannot"]
        self.warnings.update(found["warnings"])
        rss = self.memory.rss()
        during = max(self.memory.samples[first:] + [rss])
        row = Row(name, seconds, rss, during, self.memory.hwm(), problems)
        self.rows.append(row)
        path = str(self.out / f"{len(self.rows):02d}-{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')}.png")
        with contextlib.suppress(Exception):  # a missing view is already a problem of this row
            shot().screenshot(path=path) if shot else self.page.screenshot(path=path, full_page=True)
        flag = "  FAILED: " + " | ".join(problems) if problems else ""
        print(f"{name:55s} {seconds:7.1f} s  RSS {rss:6.0f} MB  peak {row.hwm_mb:6.0f} MB{flag}", flush=True)

    def idle(self, timeout_ms: int = LONG) -> None:
        """Wait until the script run ends (Streamlit's running indicator goes away)."""
        self.page.wait_for_function(
            "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=timeout_ms
        )
        self.page.wait_for_timeout(800)


def prompt_of(tokens_lo: int = 1000, tokens_hi: int = 1024) -> tuple[str, int]:
    """English text whose chat-formatted prompt is tokens_lo..tokens_hi tokens of the default model."""
    from transformers import AutoTokenizer

    from bench.longctx import prompt_text
    from explorer_core import models
    from explorer_core.config import GenerationConfig
    from explorer_core.stepper import format_prompt

    models.ensure_converted(models.resolve(models.DEFAULT_MODEL))
    tok = AutoTokenizer.from_pretrained(str(models.converted_dir()))
    want = (tokens_lo + tokens_hi) // 2
    n = want
    for _ in range(8):
        text = prompt_text(tok, n)
        count = len(format_prompt(tok, GenerationConfig(prompt=text))[0])
        if tokens_lo <= count <= tokens_hi:
            return text, count
        n += want - count
    raise SystemExit(f"could not build a prompt of {tokens_lo} to {tokens_hi} tokens (last: {count})")


# -- the user's actions --------------------------------------------------------------------------
def set_number(w: Walk, label: str, value: int) -> None:
    box = w.page.get_by_label(label, exact=True)
    box.fill(str(value))
    box.press("Enter")
    w.idle()


def pick_option(w: Walk, key: str, option: str) -> None:
    """Choose `option` in the selectbox with widget key `key`."""
    w.page.locator(f".st-key-{key}").click()
    w.page.get_by_role("option", name=option, exact=True).click()
    w.idle()


def download(w: Walk, key: str) -> Path:
    with w.page.expect_download(timeout=LONG) as info:
        w.page.locator(f".st-key-{key} button").first.click()
    path = w.out / info.value.suggested_filename
    info.value.save_as(path)
    return path


def tab(w: Walk, name: str) -> None:
    w.page.get_by_role("tab", name=name).click()
    w.idle()


def generate(w: Walk, prompt: str, new_tokens: int) -> Path:
    """The Generate page: paste the prompt, set the length, turn on the lens, Generate, download the zip."""
    pg = w.page
    with w.action("open the app"):
        pg.get_by_role("button", name="Generate").wait_for(timeout=120_000)
        w.idle()
    with w.action(f"paste a {len(prompt):,}-character prompt"):
        box = pg.get_by_label("Prompt", exact=True)
        box.fill(prompt)
        box.press("Control+Enter")  # a text area applies its value on Ctrl+Enter (or on blur)
        w.idle()
    with w.action(f"max and min new tokens = {new_tokens}, logit lens on"):
        pg.get_by_text("Length and stopping").click()
        set_number(w, "max new tokens", new_tokens)
        set_number(w, "min new tokens", new_tokens)
        pg.get_by_text("Recording and model").click()
        if not pg.get_by_role("switch", name="logit lens").is_checked():
            pg.locator(".st-key-sidebar_logit_lens label").first.click()
            w.idle()
        for name in ("logit lens", "capture attention"):
            if not pg.get_by_role("switch", name=name).is_checked():
                raise RuntimeError(f"{name} is off")
    with w.action("Generate (loads the model, records attention)"):
        pg.locator(".st-key-gen_generate button").first.click()
        pg.get_by_text("Inspect a step").wait_for(timeout=LONG)
        w.idle()
    with w.action("download trace.zip"):
        zip_path = download(w, "gen_dl_zip")
    return zip_path


def reload_trace(w: Walk, zip_path: Path, prompt_tokens: int) -> None:
    pg = w.page
    with w.action("Trace viewer page"):
        pg.get_by_role("link", name="Trace viewer").click()
        pg.get_by_text("Source").first.wait_for()
        w.idle()
    with w.action(f"upload trace.zip ({zip_path.stat().st_size / 2**20:.0f} MB)"):
        pg.locator("label").filter(has_text=re.compile("^Upload$")).click()
        w.idle()
        pg.locator("[data-testid='stFileUploaderDropzoneInput']").set_input_files(str(zip_path))
        pg.wait_for_function(  # the summary shows this trace's prompt length: the upload is on screen
            """n => Array.from(document.querySelectorAll("[data-testid='stMetricValue']"))
                     .some(e => e.innerText.trim().replace(',', '') === String(n))""",
            arg=prompt_tokens,
            timeout=LONG,
        )
        w.idle()


def scrolled_to(pg, text: str):
    """The page scrolled so that `text` is in view: charts far below the fold come out blank in an element
    screenshot, so a tall view is photographed where its charts are."""
    pg.get_by_text(text).first.scroll_into_view_if_needed()
    pg.wait_for_timeout(1500)
    return pg


def inspect_views(w: Walk, ig_steps: int) -> None:
    """Every tab of the step inspector on the reloaded trace, then the expanders and the HTML export."""
    pg = w.page
    with w.action("Attention tab at step 0 (the prompt's own heatmap)", shot=lambda: pg.get_by_role("tabpanel")):
        tab(w, "Attention")
        pg.get_by_text("Where step 0's query looked").first.wait_for(timeout=LONG)
    with w.action("attention: layer 3, head 5", shot=lambda: pg.get_by_role("tabpanel")):
        set_number(w, "Layer", 3)
        pick_option(w, "viewer_attn_head", "head 5")
    with w.action("attention: 512 cells per axis", shot=lambda: pg.get_by_role("tabpanel")):
        pick_option(w, "viewer_attn_bins", "512")
    with w.action("Which rule? tab", shot=lambda: pg.get_by_role("tabpanel")):
        tab(w, "Which rule?")
        pg.get_by_text("what each rule did to it").wait_for()
    with w.action("Logit lens tab", shot=lambda: pg.get_by_role("tabpanel")):
        tab(w, "Logit lens")
        pg.locator("[data-testid='stTabs'] [data-testid='stVegaLiteChart']:visible").nth(1).wait_for()
    with w.action("Branch from here at step 0: Continue from here"):
        tab(w, "Branch from here")
        pg.get_by_role("button", name="Continue from here").click()
        pg.get_by_text("Branch 1 splits from the main run").wait_for(timeout=LONG)
        w.idle()
        pg.get_by_text("Branch 1 splits from the main run").scroll_into_view_if_needed()
    what = f"integrated gradients too, at most {ig_steps} passes" if ig_steps else "the two fast attributions"
    with w.action(f"Why this token? Explain step 0 ({what})", shot=lambda: scrolled_to(pg, "Top 10 components")):
        tab(w, "Why this token?")
        if ig_steps:  # no Enter: inside the form it would submit at once; the button takes the typed value
            pg.get_by_text("Also integrated gradients", exact=False).click()
            pg.get_by_label("Integrated gradients: most gradient passes", exact=True).fill(str(ig_steps))
        pg.get_by_role("button", name="Explain").click()
        pg.get_by_text(re.compile(r"logit difference -?\d")).first.wait_for(timeout=LONG)
        w.idle()
    with w.action("last step: attention of the whole sequence", shot=lambda: pg.get_by_role("tabpanel")):
        tab(w, "Attention")
        pg.locator(".st-key-viewer_step input[type='range']").first.focus()
        pg.keyboard.press("End")
        w.idle()
        pg.get_by_text(re.compile(r"Where step [1-9]\d*'s query looked")).first.wait_for(timeout=LONG)
    with w.action("Candidates tab at the last step", shot=lambda: pg.get_by_role("tabpanel")):
        tab(w, "Candidates")
    with w.action(
        "Run the replay check", shot=lambda: pg.locator("[data-testid='stExpander']").filter(has_text="Replay check")
    ):
        pg.get_by_text("Replay check: re-score these tokens").click()
        pg.locator(".st-key-viewer_replay button").first.click()
        pg.get_by_text(re.compile("^(faithful|close|different):")).wait_for(timeout=LONG)
        w.idle()
    with w.action("download the single-file HTML and open it"):
        html = download(w, "viewer_dl_html")
        other = pg.context.browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            other.goto(html.as_uri())
            for part in ("#timeline svg", "#topk svg", "#attn svg"):
                other.locator(part).wait_for(timeout=120_000)
            other.locator(".tok").nth(5).click()
            other.wait_for_timeout(1000)
            other.screenshot(path=str(w.out / "html-export.png"), full_page=True)
        finally:
            other.close()


def other_pages(w: Walk) -> None:
    pg = w.page
    with w.action("Heads page on the loaded trace"):
        pg.get_by_role("link", name="Heads").click()
        pg.get_by_text("Attention heads").first.wait_for()
        w.idle()
        pg.locator("label").filter(has_text=re.compile("^Loaded trace$")).click()
        w.idle()
        pg.locator("[data-testid='stVegaLiteChart']").nth(1).wait_for(timeout=LONG)
    with w.action("Compare page: Run both (two more generations)"):
        pg.get_by_role("link", name="Compare models").click()
        pg.get_by_text("Compare two runs").first.wait_for()
        w.idle()
        pg.locator(".st-key-compare_go button").first.click()
        pg.get_by_text("Run B", exact=True).wait_for(timeout=LONG)
        w.idle()
    with w.action("back to Generate (every trace still in the session)"):
        pg.get_by_role("link", name="Generate").click()
        pg.get_by_text("Inspect a step").wait_for(timeout=LONG)
        w.idle()


# -- the report ----------------------------------------------------------------------------------
def table(rows: list[Row]) -> str:
    lines = [
        "| action | seconds | server RSS after | highest sampled RSS during | peak so far (VmHWM) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        failed = " — **failed**: " + "; ".join(p.replace("|", "\\|") for p in r.problems) if r.problems else ""
        lines.append(
            f"| {r.action}{failed} | {r.seconds:.1f} | {r.rss_mb:,.0f} MB | {r.during_mb:,.0f} MB | {r.hwm_mb:,.0f} MB |"
        )
    return "\n".join(lines)


def machine() -> str:
    import torch

    with open("/proc/meminfo") as fh:
        total = next(int(line.split()[1]) for line in fh if line.startswith("MemTotal")) / 2**20
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} cores, {gpu}, {total:.0f} GiB of memory, torch {torch.__version__}"


def section(rows: list[Row], prompt_tokens: int, new_tokens: int, ig_steps: int, loads: tuple[float, float]) -> str:
    peak = max(r.hwm_mb for r in rows)
    verdict = "within" if peak <= CLOUD_MB else "**over**"
    return (
        f"## {SECTION}\n\n"
        f"`make hosted-walkthrough` (`python -m tools.hosted_walkthrough`), run "
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC on {machine()}: a new visitor of the app with "
        f"`EXPLORER_HOSTED=1`, in a real Chromium. Prompt of {prompt_tokens:,} tokens (chat template included; the "
        f"hosted limit is 1,024), {new_tokens} new tokens, attention recording and logit lens on; the trace.zip "
        "downloaded and uploaded again on the Trace viewer, every view opened there, a branch, an explanation "
        f"({'integrated gradients at most ' + str(ig_steps) + ' passes' if ig_steps else 'gradient x input and AttnLRP'}), the replay check, the HTML export, then the Heads and Compare "
        "pages. Memory is the server process's (the model, every session's traces and the page scripts), "
        "sampled every 0.2 s; the browser is not counted.\n\n"
        + table(rows)
        + f"\n\nMB are MiB. Peak: {peak:,.0f} MB, {verdict} Streamlit Community Cloud's 2.7 GB (read as "
        f"2.7×10⁹ bytes, {CLOUD_MB:,.0f} MB). Seconds include drawing the page in the browser, which shares the 2 cores "
        f"with the server (1-minute load average {loads[0]:.1f} at the start, {loads[1]:.1f} at the end).\n"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="folder for screenshots and downloads (default: a temporary one)")
    p.add_argument("--new-tokens", type=int, default=128, help="max and min new tokens (hosted limit 512)")
    p.add_argument(
        "--ig-steps",
        type=int,
        default=0,
        help="also integrated gradients, at most this many passes (default 0: off, as the app)",
    )
    p.add_argument("--write", action="store_true", help="put the table into RELIABILITY.md")
    args = p.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="hosted-walkthrough-"))
    out.mkdir(parents=True, exist_ok=True)
    from playwright.sync_api import sync_playwright

    load_start = os.getloadavg()[0]
    text, count = prompt_of()
    print(f"prompt: {count} tokens; screenshots in {out}", flush=True)
    with server(out / "server.log") as (url, pid), sync_playwright() as pw:
        memory = Memory(pid)
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 2000}, accept_downloads=True)
        page.set_default_timeout(120_000)
        page.goto(url)
        walk = Walk(page, memory, out)
        try:
            zip_path = generate(walk, text, args.new_tokens)
            reload_trace(walk, zip_path, count)
            inspect_views(walk, args.ig_steps)
            other_pages(walk)
        finally:
            memory.stop()
            browser.close()
    print("\n" + table(walk.rows))
    for warning in sorted(walk.warnings):
        print("warning shown:", warning.replace("\n", " "))
    peak = max(r.hwm_mb for r in walk.rows)
    verdict = "within" if peak <= CLOUD_MB else "OVER"
    print(f"\nserver peak (VmHWM) {peak:,.0f} MB, {verdict} Community Cloud's 2.7 GB; screenshots in {out}")
    if args.write:
        from tools import mdsections

        loads = (load_start, os.getloadavg()[0])
        mdsections.write(
            ROOT / "RELIABILITY.md", SECTION, section(walk.rows, count, args.new_tokens, args.ig_steps, loads)
        )
        print("wrote RELIABILITY.md")
    return 1 if any(r.problems for r in walk.rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Measurements that need their own process: peak RSS, start-up, and the app against the CLI."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tools.appserver import streamlit_app

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
ENV = dict(os.environ, HF_HUB_OFFLINE="1")
LAUNCH = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
    "sys.stdout.write(r.stderr[-4000:]); print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def cli(n: int = 512) -> dict:
    """CLI with full attention: wall-clock tokens/s as it prints them, and the process's peak RSS."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [
            PY,
            "-c",
            LAUNCH,
            PY,
            "-m",
            "explorer_core",
            "--max_new_tokens",
            str(n),
            "--min_new_tokens",
            str(n),
            "--clean_stop",
            "false",
            "--no_png",
            "--out_dir",
            out,
        ]
        text = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, check=True).stdout
    tps = float(re.search(r"tokens in [\d.]+ s \(([\d.]+) tok/s\)", text).group(1))
    rss = int(re.search(r"MAXRSS_KB (\d+)", text).group(1)) / 1024
    return {"tps": tps, "rss_mb": rss}


def startup() -> dict:
    """First-ever load (GGUF conversion into an empty cache), then a cached load, each in a new process."""
    code = "import time; t = time.perf_counter(); from explorer_core import models; models.load(); print(time.perf_counter() - t)"
    with tempfile.TemporaryDirectory() as cache:
        env = dict(ENV, EXPLORER_CACHE_DIR=cache)
        first = float(
            subprocess.run(
                [PY, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, check=True
            ).stdout.split()[-1]
        )
        cached = float(
            subprocess.run(
                [PY, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, check=True
            ).stdout.split()[-1]
        )
    return {"first_s": first, "cached_s": cached}


def app(n: int = 512) -> dict:
    """A real `streamlit run app.py` driven by Chromium: time to first token on a fresh server,
    wall-clock tokens/s for n tokens with full attention, and the server's peak RSS (VmHWM)."""
    from playwright.sync_api import sync_playwright

    with (
        tempfile.TemporaryDirectory() as tmp,
        streamlit_app(Path(tmp) / "server.log", {"HF_HUB_OFFLINE": "1"}) as (url, pid),
    ):
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path="/usr/bin/chromium",
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
            )
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(300_000)
            page.goto(url)
            page.locator(".st-key-gen_generate button").first.wait_for()
            start = time.perf_counter()
            page.locator(".st-key-gen_generate button").first.click()
            page.locator("span[title^='step 0:']").first.wait_for()
            ttft = time.perf_counter() - start
            page.get_by_text("Inspect a step").wait_for()
            page.get_by_text("Length and stopping").click()
            for label in ("max new tokens", "min new tokens"):
                box = page.get_by_label(label, exact=True)
                box.fill(str(n))
                box.press("Enter")
                page.wait_for_timeout(1500)
            page.get_by_text("Length and stopping").click()
            page.get_by_label("clean stop").first.click(force=True)
            page.wait_for_timeout(1500)
            start = time.perf_counter()
            page.locator(".st-key-gen_generate button").first.click()
            # done when the summary's Tokens metric reads n (the page shows one tokens/s figure, model time only)
            page.wait_for_function(
                "n => [...document.querySelectorAll('[data-testid=\"stMetricValue\"]')]"
                ".some(e => e.textContent.trim() === String(n))",
                arg=n,
            )
            wall = time.perf_counter() - start
            browser.close()
        hwm = _vm_hwm_mb(pid)  # read before the server stops
    return {"ttft_s": ttft, "tokens": n, "tps": n / wall, "rss_mb": hwm}


def _vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")

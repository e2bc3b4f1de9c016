"""Long prompts: 500 to 4,000 prompt tokens, 128 new tokens, attention on against off.

Each configuration runs in a child process of its own, so its peak RSS is its own: the CLI's path
(load, generate, save trace.json + companion + PNGs) timed in parts, then the Trace viewer on the saved
run (AppTest, "Saved runs" source): time to the first screen and to another layer and head.
The prompt is English text from the standard library's docstrings, cut to the token count.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = (500, 1000, 2000, 4000)
NEW_TOKENS = 128
ROOT = Path(__file__).resolve().parents[1]
MODULES = (
    "argparse textwrap json collections itertools functools asyncio threading subprocess pathlib typing "
    "dataclasses logging unittest email http.client xml.etree.ElementTree sqlite3 decimal fractions statistics "
    "random re string datetime"
).split()


def prompt_text(tokenizer, tokens: int) -> str:
    """Deterministic English text of about `tokens` tokens (docstrings of standard library modules)."""
    import importlib

    parts = []
    for name in MODULES:
        mod = importlib.import_module(name)
        parts.append(mod.__doc__ or "")
        for attr in dir(mod):
            doc = getattr(getattr(mod, attr), "__doc__", None)
            if isinstance(doc, str) and len(doc) > 200:
                parts.append(doc)
    ids = tokenizer("\n".join(parts))["input_ids"]
    return tokenizer.decode(ids[: tokens - 3])


def child_generate(tokens: int, capture: bool, out: Path) -> dict:
    """One CLI-shaped run: load (not timed), generate, save every artifact."""
    from explorer_core import artifacts, models, tracefile
    from explorer_core.config import GenerationConfig
    from explorer_core.limits import Limits
    from explorer_core.stepper import Run

    lm = models.load()
    cfg = GenerationConfig(
        prompt=prompt_text(lm.tokenizer, tokens),
        chat=False,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        clean_stop=False,
        capture_attention=capture,
    )
    path = tracefile.recording_path(out / "trace.json") if capture else None
    out.mkdir(parents=True, exist_ok=True)
    rss_loaded = _rss_mb()
    start = time.perf_counter()
    run = Run(lm, cfg, Limits.from_env(), attention_path=str(path) if path else None)
    for _ in run:
        pass
    generated = time.perf_counter()
    if run.recorder is not None:
        run.recorder.finish()
    written = artifacts.write_all(run.trace(), run.attention(), out, pngs=True)
    saved = time.perf_counter()
    sizes = {p.name: p.stat().st_size for p in written.paths}
    return {
        "prompt_tokens": run.prompt_len,
        "steps": len(run.steps),
        "prefill_s": run.prefill_s,
        "generate_s": generated - start,
        "save_s": saved - generated,
        "total_s": saved - start,
        "peak_rss_mb": _peak_mb(),
        "rss_after_load_mb": rss_loaded,
        "companion_bytes": sum(v for k, v in sizes.items() if k.endswith(".attn.safetensors")),
        "trace_json_bytes": sizes.get("trace.json", 0),
        "png_failed": [name for name, _ in written.failed],
    }


def child_viewer(out: Path) -> dict:
    """The Trace viewer on a saved run: first screen, then another layer and head (AppTest, server side)."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.run()
    at.switch_page(_viewer_page())
    at.session_state["viewer_source_kept"] = "Saved runs"
    at.session_state["viewer_folder"] = str(out)
    start = time.perf_counter()
    at.run()
    first = time.perf_counter() - start
    assert not at.exception, at.exception
    layer = at.number_input(key="viewer_attn_layer")
    start = time.perf_counter()
    layer.set_value(3)
    at.selectbox(key="viewer_attn_head").set_value("head 5")
    at.run()
    other = time.perf_counter() - start
    assert not at.exception, at.exception
    return {"first_screen_s": first, "layer_head_s": other, "viewer_peak_rss_mb": _peak_mb()}


def _viewer_page() -> str:
    return "pages/viewer.py" if (ROOT / "pages" / "viewer.py").exists() else "app_pages/viewer.py"


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    """This process's own peak RSS (VmHWM). Not ru_maxrss: Linux carries the parent's peak across exec."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM")) / 1024


def _child(*args: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    done = subprocess.run(
        [sys.executable, "-m", "bench.longctx", *args], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise RuntimeError(f"bench child {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(sizes=SIZES) -> tuple[str, list[dict]]:
    """Every size, off then on, each in its own process; returns the markdown section and the raw rows."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for t in sizes:
            for capture in (False, True):
                out = Path(tmp) / f"{t}-{int(capture)}"
                row = {"size": t, "capture": capture, **_child("generate", str(t), str(int(capture)), str(out))}
                if capture:
                    row.update(_child("viewer", str(out)))
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    return table(rows), rows


def table(rows: list[dict]) -> str:
    lines = [
        "| prompt tokens | attention | prefill s | generate s | save s (with PNGs) | on / off (generate) | "
        "peak RSS MB | companion MB | bytes per step | viewer first screen s | layer/head switch s | viewer peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    off = {r["size"]: r for r in rows if not r["capture"]}
    for r in rows:
        base = off.get(r["size"])
        ratio = f"{r['generate_s'] / base['generate_s']:.2f}" if r["capture"] and base else "–"
        per_step = f"{r['companion_bytes'] / max(r['steps'], 1) / 1e6:.2f} MB" if r["capture"] else "–"
        viewer = (
            f"{r['first_screen_s']:.1f} | {r['layer_head_s']:.1f} | {r['viewer_peak_rss_mb']:.0f}"
            if r["capture"]
            else "– | – | –"
        )
        failed = f" ({', '.join(r['png_failed'])} failed)" if r["png_failed"] else ""
        lines.append(
            f"| {r['prompt_tokens']} | {'on' if r['capture'] else 'off'} | {r['prefill_s']:.1f} | {r['generate_s']:.1f} | "
            f"{r['save_s']:.1f}{failed} | {ratio} | {r['peak_rss_mb']:.0f} | "
            f"{r['companion_bytes'] / 1e6:.0f} | {per_step} | {viewer} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    kind, *rest = sys.argv[1:]
    if kind == "generate":
        result = child_generate(int(rest[0]), rest[1] == "1", Path(rest[2]))
    elif kind == "viewer":
        result = child_viewer(Path(rest[0]))
    else:
        text, _ = run(tuple(int(x) for x in rest) or SIZES)
        print(text)
        raise SystemExit(0)
    print(json.dumps(result))

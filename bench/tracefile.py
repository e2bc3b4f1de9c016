"""Trace size on disk, save and load times, and the viewer's time to render every chart."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from explorer_core import attnview, charts, frames, tracefile
from explorer_core.config import GenerationConfig
from explorer_core.models import LoadedModel
from explorer_core.stepper import Run

from .common import Series, timed


def make(lm: LoadedModel, n: int):
    cfg = GenerationConfig(max_new_tokens=n, min_new_tokens=n, block_eos_steps=n, clean_stop=False)
    r = Run(lm, cfg)
    for _ in r:
        pass
    return r.trace(), r.attention()


def size_and_io(lm: LoadedModel, rounds: int = 5) -> tuple[dict, list[Series]]:
    trace, attn = make(lm, 256)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        save = Series("save trace.json + companion (256 steps)")
        load = Series("load and validate both (256 steps)")
        for _ in range(rounds):
            save.values.append(timed(lambda: tracefile.save(trace, attn, path)))
            load.values.append(timed(lambda: tracefile.load(path)))
        companion = next(Path(tmp).glob("*.attn.safetensors"))
        sizes = {"trace.json": path.stat().st_size, "companion (.attn.safetensors)": companion.stat().st_size}
    sizes["prompt tokens"] = trace.prompt_len
    return sizes, [save, load]


def render_all(trace, attn) -> None:
    """Every chart the viewer shows for a step, turned into its Vega-Lite spec (what Streamlit sends)."""
    last = len(trace.steps) - 1
    layer = attn.layers - 1
    specs = [
        charts.topk_chart(frames.topk_frame(trace.steps[last])),
        charts.timeline_chart(frames.timeline_frame(trace), selected=last),
        charts.row_chart(attnview.row_frame(trace, attn, last, layer, None), "r"),
        charts.heatmap_chart(attnview.heatmap_frame(trace, attn, last, layer, None), "a"),
        charts.heads_grid_chart(attnview.heads_frame(trace, attn, last, layer), "h"),
    ]
    for c in specs:
        c.to_dict()


def viewer_render(lm: LoadedModel, rounds: int = 5) -> list[Series]:
    trace, attn = make(lm, 512)
    tmp = tempfile.TemporaryDirectory()
    path = tracefile.save(trace, attn, Path(tmp.name) / "trace.json")
    trace, attn = tracefile.load(path)  # as the viewer sees it: mapped from disk
    fn = Series("render every chart of a 512-step trace (rendering functions)")
    app = Series("viewer page run with a 512-step trace loaded (AppTest)")
    for _ in range(rounds):
        fn.values.append(timed(lambda: render_all(trace, attn)))
        app.values.append(apptest_render(trace, attn))
    return [fn, app]


def apptest_render(trace, attn) -> float:
    from streamlit.testing.v1 import AppTest

    root = Path(__file__).resolve().parents[1]
    at = AppTest.from_file(str(root / "app.py"), default_timeout=120)
    at.run()
    at.switch_page("pages/viewer.py")
    at.session_state["viewer_trace"] = (trace, attn)
    at.session_state["viewer_loaded"] = "bench"
    at.session_state["viewer_source"] = "Upload"
    start = time.perf_counter()
    at.run()
    elapsed = time.perf_counter() - start
    assert not at.exception and len(at.get("vega_lite_chart")) >= 3, at.exception
    return elapsed

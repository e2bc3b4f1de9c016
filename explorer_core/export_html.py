"""One-file sharing: a run as a single self-contained HTML page (charts inline, no network needed).

Vega, Vega-Lite and Vega-Embed are bundled into the page by vl-convert. Each chart's spec is built
once; the page swaps in the data of the clicked step. With the logit lens recorded, the commitment strip
sits under the main run's stream. Token text enters the page only escaped
(`markup.escape_text`) or inside a JSON data block whose `<`, `>` and `&` are escaped, so no token can
close the script tag or add markup. Branches are included: click any of their tokens too. The page
holds each stored step once (a branch carries only its own steps), so its size is linear in the trace's.
"""

from __future__ import annotations

import functools
import html
import json
import logging
import os

import altair as alt
import pandas as pd
import vl_convert as vlc

from . import attnview, charts, frames
from .attnstore import AttentionStore
from .markup import escape_text, stream_html
from .models import cache_dir
from .trace import Trace

log = logging.getLogger(__name__)

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Model Interpret Explorer trace</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; color: #222; }}
.tok {{ cursor: pointer; }}
.tok.sel {{ outline: 2px solid #222; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 24px; }}
pre {{ background: #f4f4f4; padding: 8px; white-space: pre-wrap; }}
pre.head {{ margin-bottom: 0; }}
details > pre {{ margin-top: 0; }}
summary {{ cursor: pointer; color: #555; margin: 4px 0; }}
table {{ border-collapse: collapse; }}
td, th {{ padding: 2px 8px; border-bottom: 1px solid #ddd; text-align: left; }}
</style>
<script>{bundle}</script></head>
<body>
<h1>Model Interpret Explorer trace</h1>
<p>{meta}</p>
<h2>Prompt</h2>{prompt}
<h2>Output</h2><div id="stream">{stream}</div><div id="commitment"></div>
{branches}
{whatif}
<p>Click a token to inspect its step. Selected: <b id="sel">main run, step 0</b></p>
<div class="grid"><div id="topk"></div><div id="attn"></div></div>
<div id="timeline"></div><div id="prompt"></div>
<script type="application/json" id="data">{data}</script>
<script>
(() => {{  // a scope of its own: the bundled libraries define short global names too
const D = JSON.parse(document.getElementById('data').textContent);
const opts = {{actions: false, renderer: 'svg'}};
function withData(template, values) {{
  const spec = JSON.parse(JSON.stringify(template)); delete spec.datasets; spec.data = {{values: values}}; return spec;
}}
vegaEmbed('#timeline', D.timeline, opts);
if (D.commitment) vegaEmbed('#commitment', D.commitment, opts);
(D.sweeps || []).forEach((w, i) => {{
  vegaEmbed('#sweep' + i + 'm', w.measured, opts);
  if (w.predicted) vegaEmbed('#sweep' + i + 'p', w.predicted, opts);
}});
function heat(path, step) {{
  const box = document.getElementById('attn');
  if (!D.rows) {{ box.textContent = 'No attention recorded in this trace.'; return; }}
  if (path !== 0) {{ box.textContent = 'Branches record no attention; pick a token of the main run to see it.'; return; }}
  const spec = withData(D.row_spec, D.rows[step]);
  spec.title = 'Where step ' + step + "'s query looked: last layer, mean over heads";
  vegaEmbed('#attn', spec, opts);
}}
if (D.prompt_spec) vegaEmbed('#prompt', D.prompt_spec, opts);
function show(path, step) {{
  const rows = D.topk[path] && D.topk[path][step - D.start[path]];  // a branch stores its own steps only
  if (!rows) return;  // an empty run: nothing to inspect
  document.querySelectorAll('.tok').forEach(e => e.classList.toggle('sel',
    Number(e.dataset.path) === path && Number(e.dataset.step) === step));
  document.getElementById('sel').textContent = (path ? 'branch ' + path : 'main run') + ', step ' + step;
  vegaEmbed('#topk', withData(D.topk_spec, rows), opts); heat(path, step);
}}
document.querySelectorAll('.tok').forEach(e => e.addEventListener('click',
  () => show(Number(e.dataset.path), Number(e.dataset.step))));
show(0, 0);
}})();
</script>
</body></html>
"""


@functools.cache
def _bundle() -> str:
    """Vega, Vega-Lite and Vega-Embed as one script. vl-convert takes about 7 s to bundle them, so the
    result is kept in the per-user cache folder (and in memory) and reused by every later export."""
    path = cache_dir() / f"vega-bundle-{vlc.__version__}.js"
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        pass
    bundle = vlc.javascript_bundle()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(bundle, encoding="utf-8")
        tmp.replace(path)  # atomic: a second process never reads half a file
    except OSError as exc:
        log.warning("could not cache the Vega bundle in %s: %s", path.parent, exc)
    return bundle


def vega_bundle() -> str:
    """The bundled Vega, Vega-Lite and Vega-Embed script (the notebook's views share one copy)."""
    return _bundle()


def warm() -> None:
    """Prepare the bundle ahead of the first export (the app calls this in the background)."""
    _bundle()


def _json_for_script(value) -> str:
    return json.dumps(value, allow_nan=False).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _records(frame: pd.DataFrame) -> list[dict]:
    return json.loads(frame.to_json(orient="records"))


def _spec(chart: alt.TopLevelMixin) -> dict:
    """The chart as a dict with its data inline. The data is inlined by hand, not by Altair's data
    transformer: that is process-global, and Streamlit switches it (for any thread) while a page draws
    a chart, which once left the page named datasets it could not resolve (an empty timeline)."""
    # the builders' specs are validated by the tests; skipping it here saves most of a second
    return _inline(chart.copy(deep=True)).to_dict(validate=False)


def _inline(chart):
    """Replace every DataFrame in a chart and its sub-charts with inline values, in place."""
    if isinstance(getattr(chart, "data", None), pd.DataFrame):
        chart.data = alt.InlineData(values=_records(chart.data))
    for part in ("layer", "vconcat", "hconcat", "concat"):
        for sub in getattr(chart, part, None) or []:
            _inline(sub)
    if getattr(chart, "spec", None) is not None and not isinstance(chart.spec, (dict, type(alt.Undefined))):
        _inline(chart.spec)
    return chart


PROMPT_HEAD_LINES = 8  # a long prompt shows this much (or PROMPT_HEAD_CHARS) and folds the rest away
PROMPT_HEAD_CHARS = 800


def prompt_html(text: str) -> str:
    """The prompt verbatim; a long one (a pasted document) shows its first lines and folds the rest into
    a <details>, so the output and the charts are not pushed a screen or more down the page."""
    cut = _head_end(text)
    if cut >= len(text):
        return f"<pre>{escape_text(text)}</pre>"
    rest = text[cut:]
    more = f"{rest.count(chr(10)) + 1} more lines, {len(rest):,} characters"
    return (
        f'<pre class="head">{escape_text(text[:cut])}</pre>'
        f"<details><summary>Show the rest of the prompt ({more})</summary><pre>{escape_text(rest)}</pre></details>"
    )


def _head_end(text: str) -> int:
    """Where the shown head ends: after PROMPT_HEAD_LINES lines or PROMPT_HEAD_CHARS characters, whichever
    comes first; a prompt barely over (under a quarter more) is shown whole rather than folded for a line."""
    end = 0
    for _ in range(PROMPT_HEAD_LINES):
        end = text.find("\n", end) + 1
        if end == 0:
            end = len(text)
            break
    end = min(end, PROMPT_HEAD_CHARS)
    return len(text) if len(text) <= end * 1.25 else end


def _whatif_html(trace: Trace) -> str:
    """Kept 'What if?' results: a table of single changes, and a pair of heatmaps per sweep (filled by script)."""
    if not (trace.interventions or trace.sweeps):
        return ""
    out = ["<h2>What if?</h2>"]
    if trace.interventions:
        head = "<tr><th>step</th><th>change</th><th>where</th><th>logit difference</th><th>before</th>"
        head += "<th>after</th><th>change (measured)</th><th>predicted (direct share)</th></tr>"
        rows = []
        for r in trace.interventions:
            pred = "n/a" if r.predicted.direct is None else f"{r.predicted.direct:+.3f}"
            vs = f"{escape_text(r.target.label)} − {escape_text(r.contrast.label)}"
            rows.append(
                f"<tr><td>{r.step}</td><td>{escape_text(r.operation)} {escape_text(r.part)}</td>"
                f"<td>{'this position' if r.scope == 'step' else 'every position'}</td><td>{vs}</td>"
                f"<td>{r.before.logit_diff:+.3f}</td><td>{r.after.logit_diff:+.3f}</td>"
                f"<td>{r.after.logit_diff - r.before.logit_diff:+.3f}</td><td>{pred}</td></tr>"
            )
        out.append(f"<table>{head}{''.join(rows)}</table>")
    for i, w in enumerate(trace.sweeps):
        corr = "n/a" if w.correlation is None else f"{w.correlation:+.2f}"
        out.append(
            f"<h3>Sweep at step {w.step} ({escape_text(w.operation)}): {escape_text(w.target.label)} − "
            f"{escape_text(w.contrast.label)}; correlation of measured and predicted {corr}</h3>"
            f'<div class="grid"><div id="sweep{i}m"></div><div id="sweep{i}p"></div></div>'
        )
    return "".join(out)


def _sweeps(trace: Trace) -> list[dict]:
    return [
        {
            "measured": _spec(
                charts.components_chart(frames.sweep_frame(w), "Measured: part changed", frames.sweep_limit(w))
            ),
            "predicted": None
            if w.predicted_heads is None
            else _spec(
                charts.components_chart(
                    frames.sweep_frame(w, predicted=True), "Predicted: direct share", frames.sweep_limit(w)
                )
            ),
        }
        for w in trace.sweeps
    ]


def _branches_html(trace: Trace) -> str:
    parts = []
    for b in trace.branches:
        origin = "the main run" if b.parent == 0 else f"branch {b.parent}"
        parts.append(f"<h3>Branch {b.id}: from {origin} at step {b.at_step}</h3>" + stream_html(b.steps, path=b.id))
    return ("<h2>Branches</h2>" + "".join(parts)) if parts else ""


def _attention(trace: Trace, attention: AttentionStore) -> dict:
    """Each step's row (binned: the page stays bounded however long the run) and the prompt's heatmap."""
    layer = attention.layers - 1
    bins = max(20, min(200, 200_000 // max(len(trace.steps), 1)))  # under ~10 MB of rows at 4,096 steps
    rows = [attnview.row_frame(trace, attention, s.step, layer, None, max_bins=bins) for s in trace.steps]
    window = attnview.Window.clamp(None, None, trace.prompt_len, 96)
    prompt = attnview.heatmap_frame(trace, attention, 0, layer, None, window)
    return {
        "rows": [_records(r.round({"weight": 5})) for r in rows],
        "row_spec": _spec(charts.row_chart(rows[0], "Where the step's query looked")),
        "prompt_spec": _spec(
            charts.heatmap_chart(prompt, f"Prompt attention, last layer ({layer}), mean over heads", 360)
        ),
    }


def _topk(trace: Trace) -> dict:
    """Top-k rows of every stored step, once: the main run's, then each branch's own steps.

    A branch's path shares its steps before at_step with its ancestors; copying them per path made the
    page grow with the paths' lengths (64 chained branches of a 4,096-step run: over a gigabyte). Only a
    branch's own tokens are clickable, and their data-step is absolute, so the page indexes
    topk[path][step - start[path]]."""
    own = {0: (0, trace.steps)} | {b.id: (b.at_step, b.steps) for b in trace.branches}
    return {
        "topk": {pid: [frames.topk_rows(s) for s in steps] for pid, (_, steps) in own.items()},
        "start": {pid: start for pid, (start, _) in own.items()},
    }


def _commitment(trace: Trace) -> dict | None:
    """The main run's commitment strip (under its stream), or None when no step has a lens."""
    if all(s.lens is None for s in trace.steps):
        return None
    return _spec(charts.commitment_chart(frames.commitment_frame(trace), width=640))


def build(trace: Trace, attention: AttentionStore | None, vega_js: str | None = None) -> str:
    """The whole page as a string. vega_js replaces the bundled Vega script (a notebook shares one copy)."""
    first = frames.topk_frame(trace.steps[0]) if trace.steps else pd.DataFrame(columns=["label", "prob"])
    data = {
        "timeline": _spec(charts.timeline_chart(frames.timeline_frame(trace))),
        "topk_spec": _spec(charts.topk_chart(first, "Top candidates")),
        **_topk(trace),
        "labels": trace.labels_upto(len(trace.steps)),
        "rows": None,
        "commitment": _commitment(trace),
        "sweeps": _sweeps(trace),
    }
    if attention is not None and trace.steps:
        data |= _attention(trace, attention)
    meta = (
        f"{trace.model.name} · {trace.model.dtype} on {trace.model.device} · {len(trace.steps)} tokens · "
        f"stopped by {trace.stop_reason} · temperature {trace.config.get('temperature')} · "
        f"top-p {trace.config.get('top_p')} · top-k {trace.config.get('top_k')} · seed {trace.config.get('seed')}"
    )
    return _PAGE.format(
        bundle=_bundle() if vega_js is None else vega_js,
        meta=html.escape(meta),
        prompt=prompt_html(trace.input_text),
        stream=stream_html(trace.steps),
        branches=_branches_html(trace),
        whatif=_whatif_html(trace),
        data=_json_for_script(data),
    )

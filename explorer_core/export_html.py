"""One-file sharing: a run as a single self-contained HTML page (charts inline, no network needed).

Vega, Vega-Lite and Vega-Embed are bundled into the page by vl-convert. Token text enters the page
only HTML-escaped (the stream) or inside a JSON data block whose `<` are escaped, so no token can
close the script tag or add markup.
"""

from __future__ import annotations

import html
import json

import vl_convert as vlc

from . import attnview, charts, frames
from .attnstore import AttentionStore
from .trace import Trace

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Model Interpret Explorer trace</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; color: #222; }}
.tok {{ display: inline-block; margin: 1px; padding: 1px 3px; border-radius: 3px; font-family: monospace; cursor: pointer; }}
.tok.sel {{ outline: 2px solid #222; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 24px; }}
pre {{ background: #f4f4f4; padding: 8px; white-space: pre-wrap; }}
</style>
<script>{bundle}</script></head>
<body>
<h1>Model Interpret Explorer trace</h1>
<p>{meta}</p>
<h2>Prompt</h2><pre>{prompt}</pre>
<h2>Output</h2><div id="stream">{stream}</div>
<p>Click a token to inspect its step. Selected: <b id="sel">step 0</b></p>
<div class="grid"><div id="topk"></div><div id="attn"></div></div>
<div id="timeline"></div><div id="prompt"></div>
<script type="application/json" id="data">{data}</script>
<script>
(() => {{  // a scope of its own: the bundled libraries define short global names too
const D = JSON.parse(document.getElementById('data').textContent);
const opts = {{actions: false, renderer: 'svg'}};
vegaEmbed('#timeline', D.timeline, opts);
if (D.prompt) vegaEmbed('#prompt', D.prompt, opts);
function heat(step) {{
  if (!D.rows) {{ document.getElementById('attn').textContent = 'No attention recorded in this trace.'; return; }}
  const spec = JSON.parse(JSON.stringify(D.row_spec)); spec.data = {{values: D.rows[step]}}; delete spec.datasets;
  spec.title = 'Where step ' + step + ' looked: last layer, mean over heads';
  vegaEmbed('#attn', spec, opts);
}}
function show(step) {{
  document.querySelectorAll('.tok').forEach(e => e.classList.toggle('sel', Number(e.dataset.step) === step));
  document.getElementById('sel').textContent = 'step ' + step;
  vegaEmbed('#topk', D.topk[step], opts); heat(step);
}}
document.querySelectorAll('.tok').forEach(e => e.addEventListener('click', () => show(Number(e.dataset.step))));
show(0);
}})();
</script>
</body></html>
"""


def _json_for_script(value) -> str:
    return json.dumps(value, allow_nan=False).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _stream(trace: Trace) -> str:
    spans = []
    for s in trace.steps:
        alpha = frames.shade(s.p_raw)
        tip = html.escape(f"step {s.step}: p_raw={s.p_raw:.3f} p_proc={s.p_proc:.3f} rank {s.rank_raw}")
        spans.append(
            f'<span class="tok" data-step="{s.step}" title="{tip}" '
            f'style="background: rgba(214,39,40,{alpha:.2f})">{html.escape(s.label)}</span>'
        )
    return "".join(spans)


def build(trace: Trace, attention: AttentionStore | None, vega_js: str | None = None) -> str:
    """The whole page as a string. vega_js replaces the bundled Vega script (a notebook shares one copy)."""
    data = {
        "timeline": charts.timeline_chart(frames.timeline_frame(trace)).to_dict(),
        "topk": [
            charts.topk_chart(frames.topk_frame(s), f"Top candidates at step {s.step}").to_dict() for s in trace.steps
        ],
        "labels": trace.labels_upto(len(trace.steps)),
        "rows": None,
    }
    if attention is not None:
        layer = attention.layers - 1
        bins = max(20, min(200, 200_000 // max(len(trace.steps), 1)))  # the page stays under ~10 MB at 4,096 steps
        rows = [attnview.row_frame(trace, attention, s.step, layer, None, max_bins=bins) for s in trace.steps]
        data["rows"] = [r.round({"weight": 5}).to_dict(orient="records") for r in rows]
        data["row_spec"] = charts.row_chart(
            rows[0] if rows else attnview.row_frame(trace, attention, 0, layer, None), ""
        ).to_dict()
        prompt = attnview.heatmap_frame(
            trace, attention, 0, layer, None, attnview.Window.clamp(None, None, trace.prompt_len, 96)
        )
        data["prompt"] = charts.heatmap_chart(
            prompt, f"Prompt attention, last layer ({layer}), mean over heads", 360
        ).to_dict()
    meta = (
        f"{trace.model.name} · {trace.model.dtype} on {trace.model.device} · {len(trace.steps)} tokens · "
        f"stopped by {trace.stop_reason} · temperature {trace.config.get('temperature')} · "
        f"top-p {trace.config.get('top_p')} · top-k {trace.config.get('top_k')} · seed {trace.config.get('seed')}"
    )
    return _PAGE.format(
        bundle=vlc.javascript_bundle() if vega_js is None else vega_js,
        meta=html.escape(meta),
        prompt=html.escape(trace.input_text),
        stream=_stream(trace),
        data=_json_for_script(data),
    )

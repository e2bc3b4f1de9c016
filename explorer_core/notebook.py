"""Notebook use: `watch(model, prompt)` runs the CLI's step loop on a model name or on a model the caller
already loaded, and returns a Trace that draws itself inline (the one-file HTML view, no network).

Each inline view is an iframe (its own document, so two traces in one notebook never share element ids).
Vega travels once per kernel: the first view carries the bundle as inert text beside its iframe, and every
view's iframe evaluates that text in its own window (srcdoc frames share the notebook page's origin).
"""

from __future__ import annotations

import contextlib
import dataclasses
import html
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import PrivateAttr

from . import tracefile
from .attnstore import AttentionStore
from .config import GenerationConfig
from .trace import Trace as PlainTrace

_vega_sent = False  # whether a view shown by this kernel already carried the Vega bundle
HEAT_WINDOW = 64  # positions in a step's heatmap: a bounded number of marks however long the run

# Runs in each iframe's head, in place of the bundle: take Vega from the page, size the frame to its content.
_LOADER = """(function () {
  var src = null, p = window.parent;
  try {
    src = p.__explorerVega || null;
    if (!src) { var el = p.document.querySelector('script.explorer-vega'); if (el) { src = p.__explorerVega = el.textContent; } }
  } catch (e) { src = null; }  // a parent page on another origin
  if (src) { (0, eval)(src); } else {
    window.vegaEmbed = function (sel) {
      document.querySelector(sel).textContent = 'Charts need Vega, which travels once per notebook in the first ' +
        'trace shown by the kernel; that output is gone. Run explorer_core.notebook.reset_vega() and show this again.';
      return Promise.resolve();
    };
  }
  function fit() { if (window.frameElement) { window.frameElement.style.height = (document.documentElement.scrollHeight + 8) + 'px'; } }
  window.addEventListener('load', fit);
  document.addEventListener('DOMContentLoaded', function () { new ResizeObserver(fit).observe(document.body); });
})();"""

_CHART_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><script>{loader}</script></head>
<body style="margin: 8px; font-family: system-ui, sans-serif"><div id="chart"></div>
<script type="application/json" id="spec">{spec}</script>
<script>vegaEmbed('#chart', JSON.parse(document.getElementById('spec').textContent), {{actions: false, renderer: 'svg'}});</script>
</body></html>
"""


def watch(model: Any, prompt: str, tokenizer: Any = None, **flags: Any) -> Trace:
    """Generate from `prompt` step by step and return the trace, attention included.

    model: a name as --model takes it (the embedded default, a hub id, a local folder), or a loaded
    transformers causal LM, which then needs its `tokenizer`. flags: GenerationConfig fields
    (temperature, top_p, max_new_tokens, chat, clean_stop, seed, ...), defaults as in the CLI.
    """
    from . import models, stepper
    from .stepper import Run

    config = _config(model, prompt, flags)
    if isinstance(model, str):
        if tokenizer is not None:
            raise ValueError("tokenizer= goes with a model object; a model name brings its own tokenizer")
        lm = models.load(model, dtype=config.dtype, device=config.device, device_map=config.device_map)
    else:
        lm = models.LoadedModel.wrap(model, tokenizer, name=config.model)
    with _eval_mode(lm.model), capture_attention(lm.model, config.capture_attention):
        stepper.check_fidelity(lm)
        run = Run(lm, config)
        for _ in run:
            pass
    return attach(run.trace(), run.attention())


def _config(model: Any, prompt: str, flags: dict[str, Any]) -> GenerationConfig:
    """The run's config from watch()'s arguments; unknown or misplaced settings are named."""
    names = {f.name for f in dataclasses.fields(GenerationConfig)} - {"prompt", "model"}
    unknown = sorted(set(flags) - names)
    if unknown:
        raise TypeError(f"watch() has no setting {unknown[0]!r}: use one of {', '.join(sorted(names))}")
    if not isinstance(model, str) and {"dtype", "device", "device_map"} & set(flags):
        raise ValueError(
            "dtype, device and device_map apply to a model name; cast or move a model object yourself (model.to(...))"
        )
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be text, not {type(prompt).__name__}")
    name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
    return GenerationConfig(prompt=prompt, model=name or type(model).__name__, **flags)


@contextlib.contextmanager
def capture_attention(model: Any, needed: bool = True) -> Iterator[None]:
    """Route the model's attention through the capture function for the run (sdpa underneath, whatever
    the user loaded), then give it back the implementation it had."""
    from . import capture

    before = getattr(model.config, "_attn_implementation", None)
    if not needed or capture.installed(model):
        yield
        return
    if not capture.supports(model):
        raise ValueError(
            f"{type(model).__name__}'s attention does not go through transformers' attention interface, so its "
            "weights cannot be recorded: pass capture_attention=False"
        )
    capture.install(model)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


@contextlib.contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """Dropout off for the run, so the trace shows the model's own distribution; training mode comes back after."""
    was_training = bool(model.training)
    model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


class Trace(PlainTrace):
    """A trace that knows its attention and shows itself in a notebook (what `watch` and `Trace.load` return)."""

    _companion: Any = PrivateAttr(default=None)  # the AttentionStore, or None

    def save(self, path: str | Path) -> Path:
        """Write trace.json (path, or path/trace.json for a folder) and the attention this trace carries."""
        return tracefile.save(self, self._companion, _json_path(path))

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        """Read trace.json (or a folder holding it) with its attention companion when there is one."""
        return attach(*tracefile.load(_json_path(path)))

    def show(self, step: int = -1) -> StepView:
        """Charts of one step (negative counts from the end); draws inline in a notebook."""
        return StepView(self, step)

    def _repr_html_(self) -> str:
        return inline_html(self)

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict[str, str]:
        return {"text/html": inline_html(self), "text/plain": summary(self)}


def attach(trace: PlainTrace, attention: AttentionStore | None) -> Trace:
    """The notebook-facing trace for plain trace data and its attention."""
    out = Trace.model_construct(**{name: getattr(trace, name) for name in PlainTrace.model_fields})
    out._companion = attention
    return out


def attention_of(trace: PlainTrace) -> AttentionStore | None:
    return getattr(trace, "_companion", None)


def _json_path(path: str | Path) -> Path:
    """A .json path as given, anything else is a folder that holds trace.json."""
    path = Path(path)
    return path if path.suffix == ".json" else path / "trace.json"


def reset_vega() -> None:
    """Make the next view carry Vega again (after the output that carried it was cleared or deleted)."""
    global _vega_sent
    _vega_sent = False


def _vega_carrier() -> str:
    global _vega_sent
    if _vega_sent:
        return ""
    import vl_convert as vlc

    _vega_sent = True
    return f'<script type="text/plain" class="explorer-vega">{vlc.javascript_bundle()}</script>'


def _frame(page: str, height: int, title: str) -> str:
    """One self-sizing iframe around a page, with the Vega carrier before it when this view is the first."""
    return (
        f'{_vega_carrier()}<iframe srcdoc="{html.escape(page, quote=True)}" title="{html.escape(title)}" '
        f'style="width: 100%; height: {height}px; border: 0"></iframe>'
    )


def inline_html(trace: Trace) -> str:
    """The one-file HTML view of a trace, for a notebook cell."""
    from . import export_html

    page = export_html.build(trace, attention_of(trace), vega_js=_LOADER)
    return _frame(page, 900, "Model Interpret Explorer trace")


def summary(trace: Trace) -> str:
    """A few plain-text lines, for frontends that show no HTML."""
    return (
        f"Trace: {trace.model.name}, {len(trace.steps)} tokens, stopped by {trace.stop_reason}, "
        f"attention {'attached' if attention_of(trace) is not None else 'not attached'}\n{trace.output_text}"
    )


@dataclasses.dataclass
class StepView:
    """Charts of one step: top candidates raw and processed, and the attention of the sequence it saw."""

    trace: Trace
    step: int

    def __post_init__(self) -> None:
        n = len(self.trace.steps)
        if not -n <= self.step < n:
            raise IndexError(f"step {self.step} is out of range: this trace has {n} steps (0..{n - 1})")
        self.step %= n

    @property
    def chart(self):
        """The Altair chart (a top-k facet, beside a heatmap when the trace carries attention)."""
        import altair as alt

        from . import charts, frames

        rec = self.trace.steps[self.step]
        topk = charts.topk_chart(frames.topk_frame(rec), f"Top candidates at step {self.step} ({rec.label})")
        attention = attention_of(self.trace)
        if attention is None:
            return topk
        from . import attnview

        layer = attention.layers - 1
        length = self.trace.prompt_len + self.step
        window = attnview.Window.clamp(length - HEAT_WINDOW, None, length, HEAT_WINDOW)
        frame = attnview.heatmap_frame(self.trace, attention, self.step, layer, None, window)
        heat = charts.heatmap_chart(frame, f"Attention at step {self.step}, last layer ({layer}), mean over heads", 360)
        return alt.hconcat(topk, heat)

    def _repr_html_(self) -> str:
        spec = json.dumps(self.chart.to_dict(), allow_nan=False)
        spec = spec.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
        return _frame(_CHART_PAGE.format(loader=_LOADER, spec=spec), 560, f"Step {self.step}")

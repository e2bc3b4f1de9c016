"""Notebook use: `watch(model, prompt)` runs the CLI's step loop on a model name or on a model the caller
already loaded, and returns a Trace that draws itself inline (the one-file HTML view, no network).

Each inline view is an iframe (its own document, so two traces in one notebook never share element ids).
Vega travels once per kernel: the first view carries the bundle as inert text beside its iframe, and every
view's iframe evaluates that text in its own window (srcdoc frames share the notebook page's origin).

A watched trace's attention is recorded in a temporary folder, removed when the last trace reading it is
collected (or at exit); a saved trace has its own copy. Runs on one model may overlap (threads): the
model's mode and attention implementation are lent to them together and given back by the last.
"""

from __future__ import annotations

import contextlib
import dataclasses
import html
import json
import logging
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import PrivateAttr

from . import tracefile
from .attnstore import AttentionStore
from .config import GenerationConfig
from .trace import Trace as PlainTrace

log = logging.getLogger(__name__)
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
    Interrupted (Ctrl-C, the kernel's stop button), it returns the steps so far, stopped by "interrupted".
    Several threads may watch one model at once.
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
    with borrowed(lm.model, config.capture_attention):
        with _probe_lock:  # the probe switches the model's attention: one at a time, the others reuse its result
            stepper.check_fidelity(lm)
        run = Run(lm, config)
        reason = _drive(run)
    out = _result(run, reason)
    out._model = lm  # what_if and sweep reuse it
    return out


def _drive(run: Any) -> str | None:
    """Generate to the end. A KeyboardInterrupt stops the run and keeps the steps so far, as the CLI does
    (a step is committed whole, so the one it cut short is simply absent). Any other error removes the
    run's temporary recording before it propagates: nothing will ever read it."""
    try:
        for _ in run:
            pass
    except KeyboardInterrupt:
        return "interrupted"
    except BaseException:
        if run.recorder is not None:
            run.recorder.discard()
        raise
    return None


def _result(run: Any, reason: str | None) -> Trace:
    """The run as a notebook trace. Its temporary recording lives as long as the attention store reading it
    (every copy of the trace shares that store), then goes, or at interpreter exit at the latest."""
    trace, store = run.trace(stop_reason=reason), run.attention()
    if run.error:
        log.warning("%s; the %d steps before it are kept", run.error, len(trace.steps))
    if run.recorder is None:
        return attach(trace, None)
    if store is not None and store.steps != len(trace.steps):
        log.warning("interrupted between a step's attention and its record: this trace keeps no attention")
        store, trace = None, trace.model_copy(update={"attention": None})
    if store is None:  # stopped before the prompt was read, or dropped above: nothing worth keeping
        run.recorder.discard()
        return attach(trace, None)
    run.recorder.finish()  # a complete file, and its handle closed now rather than whenever the run is collected
    weakref.finalize(store, _remove_recording, store.path)
    return attach(trace, store)


def _remove_recording(path: Path) -> None:
    """Remove a run's temporary companion and then its folder, unless the folder holds anything else (the
    user saved a trace into it): only what the run made goes."""
    from .recorder import TEMP_PREFIX

    with contextlib.suppress(OSError):  # a file still open elsewhere (Windows) stays; a finalizer must not raise
        path.unlink(missing_ok=True)
        if path.parent.name.startswith(TEMP_PREFIX):
            path.parent.rmdir()  # refused when not empty: someone else's files stay


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
    from .models import object_name

    name = model if isinstance(model, str) else object_name(model)
    return GenerationConfig(prompt=prompt, model=name or type(model).__name__, **flags)


@dataclasses.dataclass
class _Loan:
    """What a model had before the first of its concurrent watch() runs changed it."""

    users: int
    implementation: str | None
    training: bool


_loans: dict[int, _Loan] = {}  # id(model) -> its loan, while any watch() uses the model
_loans_lock = threading.Lock()
_probe_lock = threading.Lock()


@contextlib.contextmanager
def borrowed(model: Any, capture_needed: bool = True) -> Iterator[None]:
    """The model in eval mode (dropout off: the trace shows the model's own distribution) with its attention
    routed through the capture function when needed, for a block. Runs on one model share the loan: the
    first changes the model, the last to leave gives back what it had, so one run ending never pulls
    capture from under another."""
    _lend(model, capture_needed)
    try:
        yield
    finally:
        _give_back(model)


def _lend(model: Any, capture_needed: bool) -> None:
    from . import capture

    with _loans_lock:
        loan = _loans.get(id(model)) or _Loan(
            0, getattr(model.config, "_attn_implementation", None), bool(model.training)
        )
        try:
            if capture_needed and not capture.installed(model):
                if not capture.supports(model):
                    raise ValueError(
                        f"{type(model).__name__}'s attention does not go through transformers' attention "
                        "interface, so its weights cannot be recorded: pass capture_attention=False"
                    )
                capture.install(model)
        except BaseException:
            if loan.users == 0:
                _restore(model, loan)
            raise
        model.eval()
        loan.users += 1
        _loans[id(model)] = loan


def _give_back(model: Any) -> None:
    with _loans_lock:
        loan = _loans[id(model)]
        loan.users -= 1
        if loan.users == 0:
            del _loans[id(model)]
            _restore(model, loan)


def _restore(model: Any, loan: _Loan) -> None:
    if getattr(model.config, "_attn_implementation", None) != loan.implementation:
        model.set_attn_implementation(loan.implementation)
    if loan.training:
        model.train()


class Trace(PlainTrace):
    """A trace that knows its attention and shows itself in a notebook (what `watch` and `Trace.load` return)."""

    _companion: Any = PrivateAttr(default=None)  # the AttentionStore, or None
    _model: Any = PrivateAttr(default=None)  # the LoadedModel that made it (watch), for what_if and sweep

    def what_if(
        self,
        step: int,
        part: str,
        op: str = "zero",
        scope: str = "step",
        contrast=None,
        model=None,
        tokenizer=None,
        keep: bool = True,
    ):
        """Change `part` ("L.H", "L.mlp", "embed@P", "resid:L@P") at step `step` by `op` ("zero", "mean",
        "scale:F") and measure the logit difference against `contrast` (default: the runner-up), beside
        the breakdown's prediction. Kept in this trace (saved with it) unless keep=False. The model is the
        one `watch` used, else `model` (a name, or an object with its `tokenizer`), else the trace's."""
        from . import intervene as iv

        probe = iv.Probe(self._loaded(model, tokenizer), self, step, contrast)
        (effect,) = probe.run([iv.Intervention(iv.Target.parse(part), iv.Op.parse(op), scope)])
        record = iv.record(probe, effect)
        if keep:
            self.interventions = [*self.interventions, record]
        return record

    def sweep(self, step: int, layers=None, op: str = "zero", contrast=None, model=None, tokenizer=None, keep=True):
        """Every head and MLP of `layers` (default: all) changed alone at step `step`: measured and predicted
        changes of the logit difference per part, and their correlation. Kept in this trace unless keep=False."""
        from . import intervene as iv

        probe = iv.Probe(self._loaded(model, tokenizer), self, step, contrast)
        record = iv.sweep_record(probe, probe.sweep(layers, op=iv.Op.parse(op)))
        if keep:
            self.sweeps = [*self.sweeps, record]
        return record

    def _loaded(self, model, tokenizer):
        from . import models

        if model is None:
            return self._model if self._model is not None else models.load(self.model.name)
        return models.load(model) if isinstance(model, str) else models.LoadedModel.wrap(model, tokenizer)

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
    from . import export_html

    _vega_sent = True  # the export's cached bundle: building it anew costs seconds
    return f'<script type="text/plain" class="explorer-vega">{export_html.vega_bundle()}</script>'


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
        return alt.hconcat(*(_without_autosize(c) for c in (topk, heat)))

    def _repr_html_(self) -> str:
        spec = json.dumps(self.chart.to_dict(), allow_nan=False)
        spec = spec.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
        return _frame(_CHART_PAGE.format(loader=_LOADER, spec=spec), 560, f"Step {self.step}")


def _without_autosize(chart):
    """A copy of a chart fit to go into a concat: Vega-Lite takes autosize from the top level only, and
    Altair refuses a part that carries one (the builders size standalone charts with it)."""
    import altair as alt

    part = chart.copy(deep=False)
    part.autosize = alt.Undefined
    return part

"""'What if?': change one part of the model at the inspected step and see what the step's choice does.

Nothing runs until the user asks. The measured change stands beside the breakdown's prediction (the
part's direct share), with the gap split into what later layers did and what the final norm's
rescaling did. A sweep changes every head and MLP one at a time and draws the measured changes as the
breakdown's heatmap, side by side with the prediction. Results can be kept in the trace.
"""

from __future__ import annotations

import streamlit as st

from explorer_core import admission, charts, frames
from explorer_core import intervene as iv
from explorer_core.explain import ExplainError
from explorer_core.trace import InterventionRecord, SweepRecord, Trace

from . import resources
from .base import clip, schema_limit
from .explain_view import MAX_TYPED, _contrast, _trace_id, stop_check

PROBE = "whatif_probe"  # session entry: (probe key, Probe): the last step made ready, reused by every run
RESULTS = "whatif_results"  # {(trace id, branch, step): (InterventionRecord | None, SweepRecord | None)}
OPS = {
    "zero": "zero it",
    "mean": "its mean over the sequence",
    "scale": "scale it by the factor",
    "patch": "patch it from another sequence",
    "steer": "steer: add strength × (text 1 − text 2)",
}
SECOND_PROMPT = -1  # the patch source choice that reads the second-prompt box
ALL_LAYERS = -1
MAX_KEPT = schema_limit(Trace, "interventions")
MAX_SWEEPS = schema_limit(Trace, "sweeps")


def render_whatif(trace: Trace, branch: int, step: int, key: str, state_key: str | None = None) -> None:
    """The step inspector's 'What if?' tab."""
    s = trace.path_steps(branch)[step]
    st.caption(
        f"What if a part of the model had been different at step {step}? Change a head, an MLP or the residual "
        "stream, and see the logit difference between the chosen token and a contrast, measured by the model, "
        "beside what the breakdown ('Why this token?') predicted from that part's direct share."
    )
    st.code(s.label, language=None)
    with st.form(key=f"{key}_whatif_form"):
        change = _change_form(trace, branch, key)
        typed = st.text_input(
            "Contrast token (default: the runner-up)", key=f"{key}_whatif_contrast", max_chars=MAX_TYPED
        )
        go = st.form_submit_button("Measure")
    with st.form(key=f"{key}_whatif_sweep_form"):
        c1, c2 = st.columns(2)
        layers = [ALL_LAYERS, *range(trace.model.n_layers)]
        layer = c1.selectbox(
            "Sweep",
            layers,
            key=f"{key}_whatif_sweep_layer",
            format_func=lambda v: "every head and MLP" if v == ALL_LAYERS else f"layer {v}'s heads and MLP",
        )
        sweep_op = c2.selectbox("Each part", ["zero", "mean"], format_func=OPS.get, key=f"{key}_whatif_sweep_op")
        sweep = st.form_submit_button("Sweep: change each part alone")
    if go:
        _run(trace, branch, step, _contrast(typed, None), change, None, key)
    if sweep:
        _run(trace, branch, step, _contrast(typed, None), None, (layer, sweep_op), key)
    made, swept = st.session_state.get(RESULTS, {}).get((_trace_id(trace), branch, step), (None, None))
    made = made or _kept(trace.interventions, branch, step)
    swept = swept or _kept(trace.sweeps, branch, step)
    if made is not None:
        with st.container(key=f"{key}_whatif_effect"):
            render_effect(made)
        _keep(trace, made, "interventions", MAX_KEPT, key, state_key)
        change = st.session_state.get(f"{key}_whatif_change")
        if state_key is not None and change is not None and change[0] == (_trace_id(trace), branch, step):
            _continue_button(trace, branch, step, change[1], key, state_key)
    if swept is not None:
        with st.container(key=f"{key}_whatif_sweep"):
            render_sweep(swept)
        _keep(trace, swept, "sweeps", MAX_SWEEPS, key, state_key)


def _change_form(trace: Trace, branch: int, key: str) -> dict:
    """The change's fields (inside the form): part, operation, factor, scope, steering texts, patch source."""
    n = trace.model.n_layers
    c1, c2, c3 = st.columns(3)
    out = {
        "part": c1.text_input(
            "Part",
            f"{n - 1}.mlp",
            key=f"{key}_whatif_part",
            max_chars=40,
            help="L.H: head H of layer L (e.g. 3.1); L.mlp: layer L's MLP; embed@P: position P's embedding; "
            f"resid:L or resid:L@P: the residual stream entering block L (layers 0..{n - 1}; resid:{n} is the "
            "final norm's input).",
        ),
        "op": c2.selectbox("Change", list(OPS), format_func=OPS.get, key=f"{key}_whatif_op"),
        "factor": c3.number_input("Factor or strength", -100.0, 100.0, 0.0, 0.5, key=f"{key}_whatif_factor"),
        "scope": st.radio(
            "Where",
            ["step", "all"],
            horizontal=True,
            key=f"{key}_whatif_scope",
            format_func=lambda v: (
                "this step's position only" if v == "step" else "every position (re-runs the sequence)"
            ),
        ),
    }
    with st.expander("Steering texts and patch source"):
        t1, t2 = st.columns(2)
        out["towards"] = t1.text_input("Steer: text 1 (towards)", "happy", key=f"{key}_whatif_t1", max_chars=200)
        out["away"] = t2.text_input("Steer: text 2 (away from)", "sad", key=f"{key}_whatif_t2", max_chars=200)
        p1, p2 = st.columns(2)
        paths = [SECOND_PROMPT, 0] + [b.id for b in trace.branches if b.id != branch]
        out["source"] = p1.selectbox(
            "Patch from",
            paths,
            key=f"{key}_whatif_source",
            format_func=lambda i: (
                "a second prompt" if i == SECOND_PROMPT else ("the main run" if i == 0 else f"branch {i}")
            ),
        )
        out["second"] = p2.text_input(
            "Second prompt (as many tokens as this one)",
            key=f"{key}_whatif_second",
            max_chars=2000,
            help=f"This trace's prompt is {len(trace.prompt_ids)} tokens as the model reads it (chat template included).",
        )
    return out


def _kept(records, branch: int, step: int):
    mine = [r for r in records if r.branch == branch and r.step == step]
    return mine[-1] if mine else None


def _probe(trace: Trace, branch: int, step: int, contrast, lm, cancel, any_contrast: bool = False) -> iv.Probe:
    """The step made ready once, reused while the user tries part after part on it (`any_contrast`: the
    caller does not read the logit difference, so a probe held for another contrast serves too)."""
    want = (_trace_id(trace), branch, step, contrast, id(lm))
    held = st.session_state.get(PROBE)
    same = held is not None and (held[0] == want or (any_contrast and held[0][:3] + held[0][4:] == want[:3] + want[4:]))
    if same:
        return held[1]
    st.session_state.pop(PROBE, None)  # one at a time: a probe holds the prefix's cache
    probe = iv.Probe(lm, trace, step, contrast, branch, cancel=cancel)
    st.session_state[PROBE] = (want, probe)
    return probe


def _run(trace: Trace, branch: int, step: int, contrast, change: dict | None, sweep, view_key: str) -> None:
    """Measure one change (`change`, the form's fields) or a sweep (`sweep`: layer or ALL_LAYERS, operation)."""
    import time

    lm = resources.model_for_trace(trace, "measure a change")
    if lm is None:
        return
    limits = resources.limits()
    key = (_trace_id(trace), branch, step)
    made, swept = st.session_state.get(RESULTS, {}).get(key, (None, None))
    try:
        with resources.model_job(), st.spinner("Measuring: the model runs with the part changed…"):
            cancel = stop_check(time.monotonic() + limits.max_explain_s, limits.max_explain_s)
            probe = _probe(trace, branch, step, contrast, lm, cancel)
            probe.passes.cancel = cancel
            if sweep is not None:
                layer, op = sweep
                layers = None if layer == ALL_LAYERS else [layer]
                swept = iv.sweep_record(probe, probe.sweep(layers, op=iv.Op(op)), branch)
            else:
                one = _intervention(probe, change)
                (effect,) = probe.run([one])
                made = iv.record(probe, effect, branch)
                st.session_state[f"{view_key}_whatif_change"] = (key, one)  # for "continue with it on"
    except (ExplainError, ValueError, RuntimeError) as exc:
        st.text(f"Cannot measure this change: {clip(str(exc))}")
        return
    st.session_state.setdefault(RESULTS, {})[key] = (made, swept)


def _intervention(probe: iv.Probe, f: dict) -> iv.Intervention:
    texts = (f["towards"], f["away"]) if f["op"] == "steer" else None
    ids = None
    if f["op"] == "patch":
        ids = iv.patch_source(probe, None if f["source"] == SECOND_PROMPT else f["source"], f["second"])
    return iv.Intervention(iv.Target.parse(f["part"]), iv.Op(f["op"], float(f["factor"]), ids, texts), f["scope"])


def render_effect(r: InterventionRecord) -> None:
    """Before → after, the prediction, and the gap split into later layers and the final norm."""
    delta = r.after.logit_diff - r.before.logit_diff
    st.text(
        f"{r.operation} {r.part} ({'this position' if r.scope == 'step' else 'every position'}); "
        f"logit difference: chosen {r.target.label!r} (id {r.target.id}) minus contrast {r.contrast.label!r} "
        f"(id {r.contrast.id})"
    )
    c = st.columns(4)
    c[0].metric("Before", f"{r.before.logit_diff:+.3f}")
    c[1].metric("After (measured)", f"{r.after.logit_diff:+.3f}", f"{delta:+.3f}")
    pred = r.predicted.direct
    c[2].metric("Predicted (direct share)", "n/a" if pred is None else f"{pred:+.3f}")
    c[3].metric("Gap (measured − predicted)", "n/a" if pred is None else f"{delta - pred:+.3f}")
    if pred is None:
        st.text(f"No prediction: {r.predicted.note or 'the breakdown cannot read this model'}")
    elif r.frozen_norm_logit_diff is not None:
        frozen = r.frozen_norm_logit_diff - r.before.logit_diff
        st.caption(
            f"Of the gap {delta - pred:+.3f}: later layers' reaction {frozen - pred:+.3f} (measured with the final "
            f"norm's scale held), the final norm's rescaling {delta - frozen:+.3f}. The prediction is the part's "
            "direct share: what its change adds through the residual stream with nothing after it reacting."
        )
    st.dataframe(frames.outcome_frame(r), hide_index=True)


def render_sweep(w: SweepRecord) -> None:
    """Measured changes per head and MLP beside the predicted ones, as two heatmaps, and the top 10."""
    corr = "n/a" if w.correlation is None else f"{w.correlation:+.2f}"
    st.caption(
        f"Sweep ({w.operation}, one part at a time, at this position): the change of the logit difference "
        f"({w.target.label!r} minus {w.contrast.label!r}) per part. Correlation of measured and predicted: {corr}. "
        "Red raises the chosen token over the contrast; blue lowers it."
    )
    left, right = st.columns(2)
    limit = frames.sweep_limit(w)  # one colour scale: equal colours are equal logits in both
    left.altair_chart(charts.components_chart(frames.sweep_frame(w), "Measured: part changed", limit), width="content")
    if w.predicted_heads is not None:
        predicted = charts.components_chart(frames.sweep_frame(w, predicted=True), "Predicted: direct share", limit)
        right.altair_chart(predicted, width="content")
    st.dataframe(frames.sweep_ranking(w), hide_index=True)


def _keep(trace: Trace, result, field: str, most: int, key: str, state_key: str | None) -> None:
    if state_key is None or result in getattr(trace, field):
        return
    full, attn = st.session_state[state_key]
    held = getattr(full, field)
    what = "result" if field == "interventions" else "sweep"
    if len(held) >= most:
        st.caption(f"This trace already keeps {most} {field}, the most one trace holds.")
        return
    if len(result.model_dump_json()) + 1 > admission.room(full):
        st.caption("Keeping this would take the trace past the size limit for trace.json.")
        return
    if st.button(f"Keep this {what} in the trace (saved with it)", key=f"{key}_whatif_keep_{field}"):
        st.session_state[state_key] = (full.model_copy(update={field: held + [result]}), attn)
        st.rerun()


def _continue_button(trace: Trace, branch: int, step: int, change: iv.Intervention, key: str, state_key: str) -> None:
    """Generation from this step on with the change kept on, joined to the trace as a branch."""
    from .branching import MAX_BRANCHES, next_branch_id

    full, attn = st.session_state[state_key]
    if len(full.branches) >= MAX_BRANCHES:
        st.caption(f"This trace already holds {MAX_BRANCHES} branches, the most one trace holds.")
        return
    if not st.button(f"Continue generating with this change on ({change}): a new branch", key=f"{key}_whatif_go_on"):
        return
    lm = resources.model_for_trace(trace, "continue with the change")
    if lm is None:
        return
    try:
        with resources.model_job(), st.spinner("Generating with the change kept on…"):
            probe = _probe(trace, branch, step, None, lm, None, any_contrast=True)  # the one Measure made
            probe.passes.cancel = None  # Measure's deadline is not this run's (a run has its own caps)
            run = iv.continue_with(probe, [change], room=admission.room(full), limits=resources.limits())
    except (ExplainError, ValueError, RuntimeError) as exc:
        st.text(f"Cannot continue with this change: {clip(str(exc))}")
        return
    full, attn = st.session_state[state_key]
    record = iv.branch_with(probe, run, next_branch_id(full), [change])
    st.session_state[state_key] = (full.model_copy(update={"branches": full.branches + [record]}), attn)
    st.rerun()

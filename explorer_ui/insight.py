"""Views beyond the basics: which rule changed a candidate, the logit lens and its commitment strip, the
replay check."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from explorer_core import charts, frames
from explorer_core.replay import replay
from explorer_core.trace import Trace

from . import resources


def render_stages(trace: Trace, step: int) -> None:
    s = trace.steps[step]
    if s.stages is None:
        st.caption("This trace has no per-stage record (made by an older version).")
        return
    # width="container" specs with width="stretch": only the width is fitted, so a phone gets a narrower plot
    st.altair_chart(charts.stage_chart(frames.stage_frame(s), width="container"), width="stretch")
    st.caption("Each tracked candidate (both top-k lists, the chosen token and EOS) and what each rule did to it:")
    st.dataframe(
        frames.stage_summary(s),
        hide_index=True,
        height=240,
        column_config={
            "p raw": st.column_config.NumberColumn(format="%.4f", width=70),
            "p final": st.column_config.NumberColumn(format="%.4f", width=70),
            "token_id": st.column_config.NumberColumn(width=70),
            # wide enough for the longest verdict (a removal and a larger change, about 85 characters)
            "verdict": st.column_config.TextColumn(width=620),
        },
    )


LENS_STEPS = 9  # steps around the chosen one in the lens grid: columns wide enough for a token, even on a phone


def render_lens(trace: Trace, step: int) -> None:
    if trace.steps[step].lens is None:
        st.caption(
            "Logit lens was not recorded for this run: turn on 'logit lens' in the sidebar "
            "(Recording and model) and generate again."
        )
        return
    grid = frames.lens_frame(trace, step, window=LENS_STEPS)
    st.altair_chart(charts.lens_grid_chart(grid, width="container"), width="stretch")
    title = [f"Step {step}: each layer's probability", "for the token finally chosen"]  # short lines: a phone
    chart = charts.lens_step_chart(frames.lens_step_frame(trace.steps[step]), title, width="container")
    st.altair_chart(chart, width="stretch")


def render_commitment(trace: Trace, key: str) -> None:
    """Under the stream: the layer from which each token stayed the lens's top, and the tokens the
    sampling rules chose. Nothing when no step has a lens."""
    if all(s.lens is None for s in trace.steps):
        return
    picked = st.session_state.get(key + "_step")  # the inspected step (its slider is drawn further down)
    selected = picked if isinstance(picked, int) and 0 <= picked < len(trace.steps) else None
    chart = charts.commitment_chart(frames.commitment_frame(trace), selected=selected, width="container")
    st.altair_chart(chart, width="stretch")
    st.caption(
        "The layer at which each token became the logit lens's top guess and stayed so through the last layer; "
        "▲ = the sampling rules chose a token the model did not rank first."
    )


def render_replay(trace: Trace, key: str) -> None:
    """Re-score the trace with its model and report the largest difference, per step."""
    if not st.button("Run the replay check", key=f"{key}_replay"):
        return
    lm = resources.model_for_trace(trace, "replay")
    if lm is None:
        return
    st.text(f"Replaying with the model named in the trace: {lm.source.name}")
    try:
        with resources.model_job():
            report = replay(lm, trace)
    except (ValueError, IndexError, RuntimeError) as exc:  # a model that does not fit the trace
        st.text(f"Cannot replay: {exc}")
        return
    (st.success if report.max_diff <= 1e-4 else st.warning)("Replay check finished")
    st.text(report.verdict)
    st.altair_chart(charts.replay_chart(report.per_step, width="container"), width="stretch")
    if trace.interventions or trace.sweeps:
        from explorer_core.intervene import DRIFT_OK
        from explorer_core.intervene import replay as replay_kept

        with resources.model_job():
            rows = replay_kept(lm, trace)
        st.caption(
            f"Kept 'What if?' results made again: drift of their logit differences (reproduced up to {DRIFT_OK:g})."
        )
        st.dataframe(pd.DataFrame(rows), hide_index=True)

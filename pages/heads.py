"""Heads page: every head of one layer as small heatmaps, plus a larger view of one head."""

import streamlit as st

from explorer_ui import attention_view, explain_view, frame, views
from explorer_ui.base import guarded

frame.page("Heads")
st.title("Attention heads")
sources = {"Generated run": "gen_trace", "Loaded trace": "viewer_trace"}
have = [name for name, key in sources.items() if key in st.session_state]
if not have:
    st.info("Generate a run or load a trace first; this page shows its heads.")
    st.stop()
which = st.radio("Trace", have, horizontal=True, key="heads_source")
trace, attn = st.session_state[sources[which]]
if attn is None:
    views.render_missing_attention(trace)
    st.stop()
attention_view.open_on_inspected(trace, "heads", "heads_step")  # the step, layer, head and zoom in view
step = guarded("Step", views.pick_step, trace, "heads_step", default=0) if trace.steps else 0
guarded("Heads", attention_view.render_heads, trace, attn, step, "heads")  # a failing view keeps the page
st.subheader("What each head added to the chosen token (from an explanation)")
guarded("Breakdown", explain_view.render_heads_breakdown, trace, step)

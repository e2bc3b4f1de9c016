"""Heads page: every head of one layer as small heatmaps, plus a larger view of one head."""

import streamlit as st

from explorer_core import charts, frames
from explorer_ui import frame, views

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
step = views.pick_step(trace, "heads_step") if trace.steps else 0
layer, head = views.head_choice(attn.prompt.shape[0], attn.prompt.shape[1], "heads")
window = st.slider("Positions shown (the last N)", 8, 256, 48, key="heads_window")
grid = frames.heads_frame(trace, attn, step, layer, window=window)
st.altair_chart(charts.heads_grid_chart(grid, f"Layer {layer}: every head at step {step}"))
shown = 0 if head is None else head
heat = frames.attention_frame(trace, attn, step, layer, head, window=max(window, 64))
st.altair_chart(
    charts.heatmap_chart(heat, f"Layer {layer}, {'mean over heads' if head is None else f'head {shown}'}", size=560)
)

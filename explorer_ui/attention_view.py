"""The attention tab and the Heads page body: bounded views of a trace's attention store.

Every chart goes through explorer_core.attnview, which never hands Vega more than its cell budget
whatever the length. Controls: layer, head, a window of positions and the cells per axis; for a
pooled long prompt, an exact recomputation of the window's prompt rows when the model is loaded.
"""

from __future__ import annotations

import streamlit as st

from explorer_core import attnview, charts, recompute
from explorer_core.attnstore import AttentionStore
from explorer_core.trace import Trace

CELL_CHOICES = (40, 80, 160, 256, 512)


def head_choice(n_layers: int, n_heads: int, key: str, default_layer: int | None = None) -> tuple[int, int | None]:
    c1, c2 = st.columns(2)
    default = n_layers - 1 if default_layer is None else default_layer
    layer = c1.number_input("Layer", 0, n_layers - 1, default, key=key + "_layer")
    options = ["mean over heads"] + [f"head {h}" for h in range(n_heads)]
    pick = c2.selectbox("Head", options, key=key + "_head")
    return int(layer), None if pick == options[0] else int(pick.split()[1])


def window_choice(length: int, key: str, default_bins: int = attnview.DEFAULT_BINS) -> attnview.Window:
    """Positions to show (a range slider when there is more than one) and the cells per axis."""
    c1, c2 = st.columns([3, 1])
    lo, hi = 0, length
    if length > 1:  # both ends shown are positions on screen (the caption says "Positions lo–hi" too)
        lo, last = c1.slider(
            "Positions", 0, length - 1, (0, length - 1), key=key + "_range", help="Zoom into a range of positions."
        )
        hi = last + 1
    bins = c2.selectbox("Cells per axis", CELL_CHOICES, CELL_CHOICES.index(default_bins), key=key + "_bins")
    return attnview.Window.clamp(lo, hi, length, bins)


def attention_layer(trace: Trace, store: AttentionStore, key: str) -> tuple[int, int | None] | None:
    """Layer and head picked; None (with a sentence) when the layer has no attention weights (a hybrid's
    state-space or convolution layer). The pick starts on the last layer that has weights."""
    silent = set(trace.attention.silent_layers) if trace.attention is not None else set()
    default = max((i for i in range(store.layers) if i not in silent), default=store.layers - 1)
    layer, head = head_choice(store.layers, store.heads, key, default)
    if layer in silent:
        having = [i for i in range(store.layers) if i not in silent]
        st.info(
            f"Layer {layer} has no attention weights (it is not an attention layer). Layers with attention: {having}."
        )
        return None
    return layer, head


def render_attention(
    trace: Trace, store: AttentionStore | None, step: int, key: str, lm=None, narrow: bool = False
) -> None:
    """Step `step`'s row, then the heatmap of the sequence it saw, for a chosen layer and head.

    `narrow` (half-width columns, as on Compare) draws the heatmap smaller so it is not cut off."""
    if store is None:
        render_missing_attention(trace)
        return
    picked = attention_layer(trace, store, key)
    if picked is None:
        return
    layer, head = picked
    who = "mean over heads" if head is None else f"head {head}"
    row = attnview.row_frame(trace, store, step, layer, head)
    st.altair_chart(
        charts.row_chart(
            row,
            f"Where step {step}'s query looked (layer {layer}, {who})",
            width=240 if narrow else 520,
        ),
        width="content",  # "stretch" let Streamlit's fit squash the plot to a strip
    )
    if attnview.row_sum(row) < attnview.SINK_NOTE_BELOW:  # kept as the model computed it, never renormalised
        st.caption(
            f"This row's weights sum to {attnview.row_sum(row):.3f}: the rest of the query's attention went "
            "outside the sequence, to the layer's attention sink."
        )
    length = trace.prompt_len + step
    window = window_choice(length, key)
    exact = _exact_rows(trace, store, layer, head, window, key, lm)
    frame = attnview.heatmap_frame(trace, store, step, layer, head, window, exact)
    title = [f"Attention of the sequence seen at step {step} (layer {layer}, {who})"]
    title.append(f"red outline: the row of the query that chose step {step}'s token; rows above: earlier positions")
    st.altair_chart(charts.heatmap_chart(frame, title, size=260 if narrow else 420))
    _caption(trace, store, window, exact)


def _caption(trace: Trace, store: AttentionStore, window: attnview.Window, exact) -> None:
    width = max(1, -(-(window.hi - window.lo) // window.bins))
    text = [f"Positions {window.lo}–{window.hi - 1}, {width} per cell (each cell: the mean weight it covers)."]
    if not store.exact_prompt and exact is None and window.lo < trace.prompt_len:
        pooled = -(-trace.prompt_len // store.shape.bins)
        text.append(f"Prompt rows come from the stored cells of {pooled} positions; generated rows are exact.")
    st.caption(" ".join(text))


def _exact_rows(trace, store, layer, head, window, key, lm):
    """Offer an exact recomputation of a pooled prompt's rows in the window (model needed)."""
    rows_lo, rows_hi = window.lo, min(window.hi, trace.prompt_len)
    if store.exact_prompt or rows_lo >= rows_hi or lm is None:
        return None
    if rows_hi - rows_lo > recompute.MAX_ROWS:
        st.caption(f"Zoom to at most {recompute.MAX_ROWS} prompt positions to recompute them exactly.")
        return None
    cache_key = (key, layer, rows_lo, rows_hi)
    got = st.session_state.get(key + "_exact")
    if got is not None and got[0] == cache_key:
        rows = got[1]
    elif st.button(f"Recompute prompt rows {rows_lo}–{rows_hi - 1} exactly", key=key + "_exact_btn"):
        from . import resources

        with resources.model_job(), st.spinner("Recomputing with the model…"):
            rows = recompute.prompt_rows(lm, trace.prompt_ids, layer, rows_lo, rows_hi)
        st.session_state[key + "_exact"] = (cache_key, rows)
    else:
        return None
    picked = rows.mean(axis=0) if head is None else rows[head]
    return rows_lo, picked


def render_missing_attention(trace: Trace) -> None:
    if trace.attention is None:
        st.info("This run did not record attention (attention capture was off).")
        return
    st.info(
        "Full attention is not available for this trace (its companion file was not loaded). "
        "Showing the last-layer snapshots stored inside trace.json instead."
    )
    snap = attnview.snapshot_frame(trace)
    if len(snap):
        st.altair_chart(charts.snapshot_chart(snap))


def render_heads(trace: Trace, store: AttentionStore, step: int, key: str) -> None:
    """Several heads of one layer as small heatmaps (at most MAX_HEADS_SHOWN at once), then one head larger."""
    picked = attention_layer(trace, store, key)
    if picked is None:
        return
    layer, head = picked
    first = 0
    if store.heads > attnview.MAX_HEADS_SHOWN:
        first = st.number_input(
            f"First head shown ({attnview.MAX_HEADS_SHOWN} at a time)", 0, store.heads - 1, 0, key=key + "_first"
        )
    heads = list(range(int(first), min(store.heads, int(first) + attnview.MAX_HEADS_SHOWN)))
    length = trace.prompt_len + step
    window = window_choice(length, key, default_bins=attnview.HEAD_BINS)
    grid = attnview.heads_frame(trace, store, step, layer, heads, window)
    st.altair_chart(charts.heads_grid_chart(grid, f"Layer {layer}: heads {heads[0]}–{heads[-1]} at step {step}"))
    big = attnview.heatmap_frame(trace, store, step, layer, head, attnview.Window(window.lo, window.hi, 160))
    who = "mean over heads" if head is None else f"head {head}"
    st.altair_chart(charts.heatmap_chart(big, f"Layer {layer}, {who}", size=560))

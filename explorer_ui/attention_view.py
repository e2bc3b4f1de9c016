"""The attention tab and the Heads page body: bounded views of a trace's attention store.

Every chart goes through explorer_core.attnview, which never hands Vega more than its cell budget
whatever the length. Controls: layer, head, a window of positions and the cells per axis; for a
pooled long prompt, an exact recomputation of the window's prompt rows when the model is loaded.
"""

from __future__ import annotations

import logging

import streamlit as st

from explorer_core import attnview, charts, recompute
from explorer_core.attnstore import AttentionStore
from explorer_core.trace import Trace

from .base import clip

_LOG = logging.getLogger(__name__)

CELL_CHOICES = (40, 80, 160, 256, 512)


def head_choice(n_layers: int, n_heads: int, key: str, default_layer: int | None = None) -> tuple[int, int | None]:
    c1, c2 = st.columns(2)
    default = n_layers - 1 if default_layer is None else default_layer
    layer = c1.number_input("Layer", 0, n_layers - 1, default, key=key + "_layer")
    options = ["mean over heads"] + [f"head {h}" for h in range(n_heads)]
    pick = c2.selectbox("Head", options, key=key + "_head")
    return int(layer), None if pick == options[0] else int(pick.split()[1])


def window_choice(length: int, key: str, default_bins: int = attnview.DEFAULT_BINS) -> attnview.Window:
    """Positions to show (a range slider when there is more than one) and the cells per axis.

    The zoom is kept under key_zoom, apart from the slider: the slider's range grows with the step, and
    a slider whose range changes starts over, which lost the zoom at every step change."""
    c1, c2 = st.columns([3, 1])
    lo, hi = 0, length
    if length > 1:  # both ends shown are positions on screen (the caption says "Positions lo–hi" too)
        rkey, zkey = key + "_range", key + "_zoom"
        if st.session_state.get(zkey) is not None:
            st.session_state[rkey] = _zoom_for(st.session_state[zkey], length)
        lo, last = c1.slider(
            "Positions",
            0,
            length - 1,
            (0, length - 1),
            key=rkey,
            help="Zoom into a range of positions.",
            on_change=_keep_zoom,
            args=(rkey, zkey, length),
        )
        hi = last + 1
    bins = c2.selectbox("Cells per axis", CELL_CHOICES, CELL_CHOICES.index(default_bins), key=key + "_bins")
    return attnview.Window.clamp(lo, hi, length, bins)


def _keep_zoom(rkey: str, zkey: str, length: int) -> None:
    lo, last = st.session_state[rkey]
    st.session_state[zkey] = (int(lo), int(last), length)


def _zoom_for(zoom: tuple[int, int, int], length: int) -> tuple[int, int]:
    """A zoom made at another step, on this step's positions: a zoom that reached the last position
    follows it (the newest tokens stay in view); one inside the sequence stays where it was."""
    lo, last, then = zoom
    last = length - 1 if last >= then - 1 else min(last, length - 1)
    lo = min(lo, last)
    return lo, last


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
    length = trace.prompt_len + step
    window = window_choice(length, key)
    remember(trace, step, layer, head, key)
    _render_row(trace, store, step, layer, head, window)
    exact = _exact_rows(trace, store, layer, head, window, key, lm)
    frame = attnview.heatmap_frame(trace, store, step, layer, head, window, exact)
    who = "mean over heads" if head is None else f"head {head}"
    title = ["Attention of the sequence seen", f"at step {step}, layer {layer}, {who}"]  # short lines: a phone
    _square_heatmap(charts.heatmap_chart(frame, title, size=300 if narrow else 320, width="container"), narrow)
    st.caption(f"Red outline: the row of the query that chose step {step}'s token; rows above: earlier positions.")
    _caption(trace, store, window, exact)


INSPECTED = "attention_inspected"  # session key: what the attention view shows now, for the Heads page


def remember(trace: Trace, step: int, layer: int, head: int | None, key: str) -> None:
    """Note the trace, step, layer, head and zoom on screen, so the Heads page opens on them."""
    zoom = st.session_state.get(key + "_zoom")
    st.session_state[INSPECTED] = {"created": trace.created, "step": step, "layer": layer, "head": head, "zoom": zoom}


def open_on_inspected(trace: Trace, key: str, step_key: str) -> None:
    """On opening a page (its layer widget not yet in the session), start its widgets on what the
    attention view was showing for the same trace: step, layer, head and zoom."""
    seen = st.session_state.get(INSPECTED)
    if not seen or seen["created"] != trace.created or key + "_layer" in st.session_state:
        return
    st.session_state[step_key] = min(seen["step"], max(0, len(trace.steps) - 1))
    st.session_state[key + "_layer"] = seen["layer"]
    st.session_state[key + "_head"] = "mean over heads" if seen["head"] is None else f"head {seen['head']}"
    st.session_state[key + "_zoom"] = seen["zoom"]


def _render_row(trace: Trace, store: AttentionStore, step: int, layer: int, head, window) -> None:
    """Where step `step`'s query looked, over the zoomed positions (the heatmap's window)."""
    who = "mean over heads" if head is None else f"head {head}"
    row = attnview.row_frame(trace, store, step, layer, head, lo=window.lo, hi=window.hi)
    title = [f"Where step {step}'s query looked", f"layer {layer}, {who}, positions {window.lo}–{window.hi - 1}"]
    # the spec fits only its width to the column (charts.sized), so the plot is never squashed to a strip
    st.altair_chart(charts.row_chart(row, title, width="container"), width="stretch")
    total = float(store.row(step, layer, head).sum())  # the whole row, whatever the zoom
    if total < attnview.SINK_NOTE_BELOW:  # kept as the model computed it, never renormalised
        st.caption(
            f"This row's weights sum to {total:.3f}: the rest of the query's attention went "
            "outside the sequence, to the layer's attention sink."
        )


def _square_heatmap(chart, narrow: bool) -> None:
    """A heatmap that fits its column and stays square-ish: its height is fixed, so on a wide screen it
    takes two thirds of the page (columns stack to the full width on a phone, about as wide as tall)."""
    where = st if narrow else st.columns([2, 1])[0]
    where.altair_chart(chart, width="stretch")


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
        rows = _recompute(trace, lm, layer, rows_lo, rows_hi)
        if rows is None:
            return None
        st.session_state[key + "_exact"] = (cache_key, rows)
    else:
        return None
    picked = rows.mean(axis=0) if head is None else rows[head]
    return rows_lo, picked


def _recompute(trace, lm, layer: int, rows_lo: int, rows_hi: int):
    """The exact rows, or None after an error shown in their place: the pooled heatmap below and the
    rest of the page stay (a failure here once replaced everything under it)."""
    from . import resources

    try:
        with resources.model_job(), st.spinner("Recomputing with the model…"):
            return recompute.prompt_rows(lm, trace.prompt_ids, layer, rows_lo, rows_hi)
    except Exception as exc:  # Stop and reruns are BaseExceptions and pass through
        _LOG.exception("recompute of layer %d rows %d..%d failed", layer, rows_lo, rows_hi)
        st.error(
            f"Prompt rows {rows_lo}–{rows_hi - 1} of layer {layer} could not be recomputed; "
            "the heatmap below shows the stored pooled cells instead."
        )
        st.text(f"{type(exc).__name__}: {clip(str(exc))}")  # plain text: the message may quote a model name
        return None


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
        st.altair_chart(charts.snapshot_chart(snap, width="container"), width="stretch")


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
    title = f"Layer {layer}: heads {heads[0]}–{heads[-1]} at step {step}"
    st.altair_chart(charts.heads_grid_chart(grid, title), width="content")  # a facet keeps its own size
    big = attnview.heatmap_frame(trace, store, step, layer, head, attnview.Window(window.lo, window.hi, 160))
    who = "mean over heads" if head is None else f"head {head}"
    _square_heatmap(charts.heatmap_chart(big, [f"Layer {layer}, {who}"], size=360, width="container"), False)

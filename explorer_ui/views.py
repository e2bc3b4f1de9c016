"""Shared views of a trace, used by every page: summary, step inspector, timeline, attention, downloads.

Token text is untrusted (it comes from models and uploaded files): it reaches the screen only as
chart data, dataframe cells, st.text/st.code, or HTML escaped by `base.escape_text`.
"""

from __future__ import annotations

import io
import zipfile

import streamlit as st

from explorer_core import charts, frames
from explorer_core import trace as trace_io
from explorer_core.trace import AttentionData, Trace

from . import branching, insight
from .base import render_stream


def render_cost_estimate(config, lm, limits) -> None:
    """Before a run: what recording attention will take, against the budget (needs the model's shape)."""
    if not config.capture_attention or lm is None:
        return
    from explorer_core.limits import attention_mb
    from explorer_core.stepper import format_prompt

    try:
        t = len(format_prompt(lm.tokenizer, config)[0])
    except ValueError:
        return
    mb = attention_mb(t, config.max_new_tokens, lm.n_layers, lm.n_heads)
    over = (
        " — over the budget, lower max new tokens or turn attention capture off"
        if mb > limits.attention_budget_mb
        else ""
    )
    st.caption(
        f"Attention recording for this run: up to {mb:,.0f} MB in memory "
        f"(budget {limits.attention_budget_mb:,} MB){over}."
    )


TOKENS_PER_S_HELP = "Generated tokens divided by model time: the prefill plus every step, display excluded."


def render_summary(trace: Trace) -> None:
    cols = st.columns(3)
    cols[0].metric("Tokens", len(trace.steps))
    cols[1].metric("Tokens/s", f"{trace.timing.tokens_per_s:.1f}", help=TOKENS_PER_S_HELP)
    cols[2].metric("Prompt tokens", trace.prompt_len)
    # plain text, not a metric: a narrow metric cuts "max new tokens" to "max new to..."
    st.text(f"Stopped by: {trace.stop_reason.replace('_', ' ')}")
    st.text(
        f"{trace.model.name} · {trace.model.dtype} on {trace.model.device} · "
        f"{trace.model.n_layers} layers × {trace.model.n_heads} heads"
    )


def pick_step(trace: Trace, key: str) -> int:
    """A step selector; the token table below it can also set the step (click a row)."""
    n = len(trace.steps)
    if n == 1:
        st.caption("One step in this trace.")
        return 0
    sel = st.session_state.get(key + "_table")
    rows = list(getattr(getattr(sel, "selection", None), "rows", None) or [])
    if rows and rows != st.session_state.get(key + "_table_seen"):  # a new click in the table wins once
        st.session_state[key] = min(int(rows[0]), n - 1)
    st.session_state[key + "_table_seen"] = rows
    if st.session_state.get(key, 0) > n - 1:
        st.session_state[key] = n - 1
    return int(st.slider("Step", 0, n - 1, key=key))


def token_table(trace: Trace, key: str) -> None:
    st.dataframe(
        frames.stream_frame(trace),
        key=key + "_table",
        on_select="rerun",
        selection_mode="single-row",
        hide_index=True,
        height=220,
    )


def render_step(trace: Trace, step: int, narrow: bool = False) -> None:
    """The chosen token and the top-k bars; `narrow` (half-width columns) stacks raw above processed."""
    s = trace.steps[step]
    st.caption(f"Step {step} chose this token (raw rank {s.rank_raw}, p_raw {s.p_raw:.4f}, p_proc {s.p_proc:.4f}):")
    st.code(s.label, language=None)
    chart = charts.topk_chart(frames.topk_frame(s), "Top candidates", columns=1 if narrow else 2)
    st.altair_chart(chart, width="content")


def render_timeline(trace: Trace, step: int, narrow: bool = False) -> None:
    chart = charts.timeline_chart(frames.timeline_frame(trace), selected=step, width=300 if narrow else 640)
    st.altair_chart(chart, width="content")


def head_choice(n_layers: int, n_heads: int, key: str) -> tuple[int, int | None]:
    c1, c2 = st.columns(2)
    layer = c1.number_input("Layer", 0, n_layers - 1, n_layers - 1, key=key + "_layer")
    options = ["mean over heads"] + [f"head {h}" for h in range(n_heads)]
    pick = c2.selectbox("Head", options, key=key + "_head")
    return int(layer), None if pick == options[0] else int(pick.split()[1])


def render_attention(trace: Trace, attn: AttentionData | None, step: int, key: str, narrow: bool = False) -> None:
    """Attention heatmaps; `narrow` (half-width columns) draws them smaller so they are not cut off."""
    if attn is None:
        render_missing_attention(trace)
        return
    layer, head = head_choice(attn.prompt.shape[0], attn.prompt.shape[1], key)
    who = "mean over heads" if head is None else f"head {head}"
    frame = frames.attention_frame(trace, attn, step, layer, head, window=160)
    size = 260 if narrow else 420
    title = f"Attention when choosing step {step} (layer {layer}, {who})"
    st.altair_chart(charts.heatmap_chart(frame, title, size=size))
    if trace.prompt_len + step > 160:
        st.caption("Showing the last 160 positions; the trace holds them all.")
    prompt = frames.prompt_frame(trace, attn, layer, head)
    st.altair_chart(charts.heatmap_chart(prompt, f"Prompt attention (layer {layer}, {who})", size=size))


def render_missing_attention(trace: Trace) -> None:
    if trace.attention is None:
        st.info("This run did not record attention (attention capture was off).")
        return
    if not trace.steps:
        st.info("This run was stopped before its first token, so it has no attention to show.")
        return
    st.info(
        "Full attention is not available for this trace (its companion file was not loaded). "
        "Showing the last-layer snapshots stored inside trace.json instead."
    )
    snap = frames.snapshot_frame(trace)
    if len(snap):
        st.altair_chart(charts.snapshot_chart(snap))


def archive_bytes(trace: Trace, attn: AttentionData | None) -> bytes:
    buf = io.BytesIO()
    info = (
        trace.attention.model_copy(update={"file": "trace.attn.npz"})
        if (attn is not None and trace.attention)
        else trace.attention
    )
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("trace.json", trace_io.dumps(trace.model_copy(update={"attention": info})))
        if attn is not None:
            zf.writestr("trace.attn.npz", trace_io.attention_bytes(attn))
        zf.writestr("output.txt", trace.output_text + "\n")
    return buf.getvalue()


def render_downloads(trace: Trace, attn: AttentionData | None, key: str) -> None:
    from explorer_core.export_html import build

    # on_click="ignore": a rerun per click would drop the files behind the other buttons while the
    # browser still fetches them (quick clicks then fetched nothing: "Deferred file ... not found")
    c1, c2, c3, c4 = st.columns(4)
    c1.download_button(
        "trace.json",
        trace_io.dumps(trace.model_copy(update={"attention": _no_file(trace)})),
        file_name="trace.json",
        mime="application/json",
        key=key + "_dl_json",
        on_click="ignore",
    )
    c2.download_button(
        "output.txt",
        trace.output_text + "\n",
        file_name="output.txt",
        mime="text/plain",
        key=key + "_dl_txt",
        on_click="ignore",
    )
    c3.download_button(
        "All (zip, with attention)",
        lambda: archive_bytes(trace, attn),
        file_name="trace.zip",
        mime="application/zip",
        key=key + "_dl_zip",
        on_click="ignore",
    )
    c4.download_button(
        "Single-file HTML",
        lambda: build(trace, attn),
        file_name="trace.html",
        mime="text/html",
        key=key + "_dl_html",
        on_click="ignore",
    )


def _no_file(trace: Trace):
    return trace.attention.model_copy(update={"file": None}) if trace.attention else None


TABS = ["Candidates", "Attention", "Which rule?", "Logit lens", "Branch from here"]


def render_trace(source: str | tuple[Trace, AttentionData | None], key: str, live_run=None) -> None:
    """Every view of a finished (or partial) trace, the same for live runs and loaded files.

    `source` is either the data itself, or the name of the session entry holding it; only a trace
    kept in the session can grow branches.
    """
    state_key = source if isinstance(source, str) else None
    if state_key is not None:
        branching.settle_branch(state_key)  # a branch cut short by Stop joins the trace as a partial branch
        trace, attn = st.session_state[state_key]
    else:
        trace, attn = source
    if not trace.steps:
        st.warning("This trace has no generated tokens.")
        return
    branch_id = branching.path_choice(trace, key + "_path")
    view, view_attn = branching.path_view(trace, attn, branch_id)
    render_summary(view)
    st.subheader("Output")
    render_stream(view.steps)
    st.subheader("Inspect a step")
    step = pick_step(view, key + "_step")
    token_table(view, key + "_step")
    # keyed and tracked, so the open tab survives the rerun that follows a new branch
    tabs = st.tabs(TABS, key=key + "_tabs", on_change="rerun")
    with tabs[0]:
        render_step(view, step)
    with tabs[1]:
        if branch_id and attn is not None:
            st.caption("Branches record no attention; pick the main run to see it.")
        render_attention(view, view_attn, step, key + "_attn")
    with tabs[2]:
        insight.render_stages(view, step)
    with tabs[3]:
        insight.render_lens(view, step)
    with tabs[4]:
        if state_key is None:
            st.caption("Branching works on the Generate and Trace viewer pages.")
        else:
            branching.render_branch_form(trace, branch_id, step, state_key, live_run)
    render_timeline(view, step)
    branching.render_branches(trace)
    with st.expander("Replay check: re-score these tokens with the model"):
        insight.render_replay(view, key)
    st.subheader("Download")
    render_downloads(trace, attn, key)


def empty_prompt_note(config) -> str:
    """What the model starts from when the prompt box is empty."""
    if config.chat:
        return (
            "The prompt is empty: the model starts from the chat template alone (an empty user turn), "
            "or from the BOS token if the model has no chat template."
        )
    return "The prompt is empty: generation starts from the BOS token alone."

"""Shared views of a trace, used by every page: stream, step inspector, timeline, attention, downloads.

Token text is untrusted (it comes from models and uploaded files): it reaches the screen only as
chart data, dataframe cells, st.text/st.code, or HTML with every special character escaped.
"""

from __future__ import annotations

import io
import zipfile

import streamlit as st

from explorer_core import charts, frames
from explorer_core import trace as trace_io
from explorer_core.attnstore import AttentionStore
from explorer_core.trace import StepRecord, Trace

from .attention_view import head_choice, render_attention, render_missing_attention  # noqa: F401 - shared names

_MARKUP = set("*_$[]()`~#|:\\{}!<>&\"'=")


def escape_text(text: str) -> str:
    """Escape every HTML and Markdown/LaTeX character in one pass (as numeric entities), so text shows
    verbatim in st.html and nothing in it can start a tag, an attribute or a formatting run."""
    return "".join(f"&#{ord(ch)};" if ch in _MARKUP else ch for ch in text)


def stream_html(steps: list[StepRecord]) -> str:
    """Tokens shaded by probability: the less likely under the raw model, the stronger the shade."""
    spans = []
    for s in steps:
        alpha = frames.shade(s.p_raw)
        tip = escape_text(f"step {s.step}: {s.label}  p_raw={s.p_raw:.3f}  p_proc={s.p_proc:.3f}  rank {s.rank_raw}")
        spans.append(
            f'<span title="{tip}" style="background: rgba(214,39,40,{alpha:.2f}); border-radius: 3px; '
            f'padding: 1px 2px; margin: 1px; display: inline-block; font-family: monospace;">'
            f"{escape_text(s.label)}</span>"
        )
    return '<div style="line-height: 1.9;">' + "".join(spans) + "</div>"


def render_stream(trace: Trace, container=None) -> None:
    target = container if container is not None else st
    target.html(stream_html(trace.steps) if trace.steps else "<div><i>no tokens yet</i></div>")


def render_cost_estimate(config, lm, limits) -> None:
    """Before a run: the weights' size for the chosen model and dtype, and what recording attention will
    take (that part needs the tokenizer, so it shows once the model is loaded), against the limits."""
    from explorer_core import plan
    from explorer_core.models import ModelLoadError
    from explorer_core.stepper import format_prompt

    try:
        shape = plan.shape_of_model(lm.model) if lm is not None else plan.shape_for_name(config.model.strip())
    except ModelLoadError:
        return  # the model is not readable yet; loading it will say why
    t = None
    if lm is not None:
        try:
            t = len(format_prompt(lm.tokenizer, config)[0])
        except ValueError:
            pass
    p = plan.plan(shape, config, limits, t)
    parts = [f"Weights: about {plan.megabytes(p.weights_mb)} MB in {p.dtype} (limit {limits.max_model_mb:,} MB)"]
    if p.kv_cache_mb is not None:
        parts.append(f"key/value cache up to {plan.megabytes(p.kv_cache_mb)} MB")
    cost = p.attention
    if cost is not None:
        pooled = "exact" if cost.prompt_cells == t else f"pooled into {cost.prompt_cells}×{cost.prompt_cells} cells"
        parts.append(
            f"attention recording for this {t}-token prompt: up to {cost.disk_mb:,.0f} MB written "
            f"(budget {limits.attention_budget_mb:,} MB), about {cost.memory_mb:,.0f} MB held while running; "
            f"the prompt's own attention {pooled}"
        )
    st.caption("; ".join(parts) + ".")
    if p.refusals:
        st.warning("This run will not fit this host's limits:")
        for refusal in p.refusals:
            st.text(refusal)  # plain text: it may quote the model name the user typed


def render_summary(trace: Trace) -> None:
    cols = st.columns(4)
    cols[0].metric("Tokens", len(trace.steps))
    cols[1].metric("Tokens/s", f"{trace.timing.tokens_per_s:.1f}")
    cols[2].metric("Stopped by", trace.stop_reason.replace("_", " "))
    cols[3].metric("Prompt tokens", trace.prompt_len)
    st.caption("Model and settings")
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


def render_step(trace: Trace, step: int) -> None:
    s = trace.steps[step]
    st.caption(f"Step {step} chose this token (raw rank {s.rank_raw}, p_raw {s.p_raw:.4f}, p_proc {s.p_proc:.4f}):")
    st.code(s.label, language=None)
    st.altair_chart(charts.topk_chart(frames.topk_frame(s), "Top candidates"), width="content")


def render_timeline(trace: Trace, step: int) -> None:
    st.altair_chart(charts.timeline_chart(frames.timeline_frame(trace), selected=step), width="content")


ZIP_MAX_BYTES = 512 * 2**20  # a download is built in the server's memory: bigger companions stay on disk


def archive_bytes(trace: Trace, attn: AttentionStore | None) -> bytes:
    """trace.json, its companion (stored as is: float16 does not deflate) and output.txt in one zip."""
    buf = io.BytesIO()
    name = "trace.attn.safetensors"
    info = trace.attention.model_copy(update={"file": name if attn is not None else None}) if trace.attention else None
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("trace.json", trace_io.dumps(trace.model_copy(update={"attention": info})))
        if attn is not None:
            with zf.open(zipfile.ZipInfo(name), "w", force_zip64=True) as fh:  # stored: float16 does not deflate
                attn.write_to(fh)
        zf.writestr("output.txt", trace.output_text + "\n")
    return buf.getvalue()


def render_downloads(trace: Trace, attn: AttentionStore | None, key: str) -> None:
    from explorer_core.export_html import build

    c1, c2, c3, c4 = st.columns(4)
    c1.download_button(
        "trace.json",
        trace_io.dumps(trace.model_copy(update={"attention": _no_file(trace)})),
        file_name="trace.json",
        mime="application/json",
        key=key + "_dl_json",
    )
    c2.download_button(
        "output.txt", trace.output_text + "\n", file_name="output.txt", mime="text/plain", key=key + "_dl_txt"
    )
    if attn is not None and attn.nbytes() > ZIP_MAX_BYTES:
        c3.caption(
            f"The attention file is {attn.nbytes() / 2**20:,.0f} MiB, too big to download from the browser: "
            "the command line writes it to disk (`--out_dir`)."
        )
    else:
        c3.download_button(
            "All (zip, with attention)",
            lambda: archive_bytes(trace, attn),
            file_name="trace.zip",
            mime="application/zip",
            key=key + "_dl_zip",
        )
    c4.download_button(
        "Single-file HTML", lambda: build(trace, attn), file_name="trace.html", mime="text/html", key=key + "_dl_html"
    )


def _no_file(trace: Trace):
    return trace.attention.model_copy(update={"file": None}) if trace.attention else None


def render_trace(
    trace: Trace, attn: AttentionStore | None, key: str, state_key: str | None = None, live_run=None
) -> None:
    """Every view of a finished (or partial) trace, the same for live runs and loaded files.

    `state_key` names the session entry holding (trace, attention), so branches can be added to it.
    """
    from . import explain_view, insight

    if state_key is not None:
        insight.settle_branch(state_key)  # a branch cut short by Stop joins the trace as a partial branch
        trace, attn = st.session_state[state_key]
    if not trace.steps:
        st.warning("This trace has no generated tokens.")
        return
    branch_id = insight.path_choice(trace, key + "_path")
    view, view_attn = insight.path_view(trace, attn, branch_id)
    render_summary(view)
    st.subheader("Output")
    render_stream(view)
    st.subheader("Inspect a step")
    step = pick_step(view, key + "_step")
    token_table(view, key + "_step")
    tabs = st.tabs(["Candidates", "Attention", "Which rule?", "Logit lens", "Branch from here", "Why this token?"])
    with tabs[0]:
        render_step(view, step)
    with tabs[1]:
        if branch_id and attn is not None:
            st.caption("Branches record no attention; pick the main run to see it.")
        from .resources import loaded_already

        lm = loaded_already(view.model.name, "auto", "auto")  # for exact recomputation, never loaded here
        render_attention(view, view_attn, step, key + "_attn", lm)
    with tabs[2]:
        insight.render_stages(view, step)
    with tabs[3]:
        insight.render_lens(view, step)
    with tabs[4]:
        if state_key is None:
            st.caption("Branching works on the Generate and Trace viewer pages.")
        else:
            insight.render_branch_form(trace, branch_id, step, state_key, live_run)
    with tabs[5]:
        explain_view.render_explain(trace, branch_id, step, key, state_key)
    render_timeline(view, step)
    insight.render_branches(trace)
    with st.expander("Replay check: re-score these tokens with the model"):
        insight.render_replay(view, key)
    st.subheader("Download")
    render_downloads(trace, attn, key)

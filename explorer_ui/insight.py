"""Views beyond the basics: which rule removed a candidate, logit lens, branches, replay check, HTML export."""

from __future__ import annotations

import streamlit as st

from explorer_core import charts, frames
from explorer_core.attnstore import AttentionStore
from explorer_core.config import GenerationConfig
from explorer_core.replay import replay
from explorer_core.stepper import Run
from explorer_core.trace import Trace

from . import live, resources

MAX_BRANCHES = 64  # the trace schema's limit


def render_stages(trace: Trace, step: int) -> None:
    s = trace.steps[step]
    if s.stages is None:
        st.caption("This trace has no per-stage record (made by an older version).")
        return
    st.altair_chart(charts.stage_chart(frames.stage_frame(s)), width="content")
    st.caption("Each tracked candidate (both top-k lists, the chosen token and EOS) and what each rule did to it:")
    st.dataframe(
        frames.stage_summary(s),
        hide_index=True,
        height=240,
        column_config={
            "p raw": st.column_config.NumberColumn(format="%.4f"),
            "p final": st.column_config.NumberColumn(format="%.4f"),
        },
    )


def render_lens(trace: Trace, step: int) -> None:
    if trace.steps[step].lens is None:
        st.caption(
            "Logit lens was not recorded for this run: turn on 'logit lens' in the sidebar "
            "(Recording and model) and generate again."
        )
        return
    st.altair_chart(charts.lens_grid_chart(frames.lens_frame(trace, step)), width="content")
    st.altair_chart(
        charts.lens_step_chart(
            frames.lens_step_frame(trace.steps[step]),
            f"Step {step}: each layer's probability for the token finally chosen",
        ),
        width="content",
    )


def path_choice(trace: Trace, key: str) -> int:
    """Which path to view: 0 is the main run, otherwise a branch id."""
    if not trace.branches:
        return 0
    options = [0] + [b.id for b in trace.branches]
    labels = {0: "main run"} | {
        b.id: f"branch {b.id} (from {'main' if b.parent == 0 else f'branch {b.parent}'}, step {b.at_step})"
        for b in trace.branches
    }
    return int(st.radio("Path", options, format_func=labels.get, horizontal=True, key=key))


def path_view(trace: Trace, attn: AttentionStore | None, branch_id: int) -> tuple[Trace, AttentionStore | None]:
    """A branch seen as a trace of its own (for the shared views); branches carry no attention."""
    if branch_id == 0:
        return trace, attn
    b = trace.branch(branch_id)
    view = trace.model_copy(
        update={
            "steps": trace.path_steps(branch_id),
            "output_text": b.output_text,
            "stop_reason": b.stop_reason,
            "branches": [],
            "attention": None,
        }
    )
    return view, None


def render_branch_form(trace: Trace, parent_id: int, step: int, state_key: str, live_run: Run | None) -> None:
    """Pick another candidate at this step (or type a token) and continue from there."""
    s = trace.path_steps(parent_id)[step]
    # the most likely other candidates first; the token actually taken last
    options = [i for i in dict.fromkeys(s.top_proc.ids + s.top_raw.ids) if i != s.token_id] + [s.token_id]
    labels = {**dict(zip(s.top_raw.ids, s.top_raw.labels)), **dict(zip(s.top_proc.ids, s.top_proc.labels))}
    with st.form(key=f"{state_key}_branch_form"):
        pick = st.selectbox(
            "Candidate",
            options,
            format_func=lambda i: (
                f"{labels.get(i, s.label)}  (id {i})" + ("  — the token taken" if i == s.token_id else "")
            ),
            key=f"{state_key}_branch_pick",
        )
        typed = st.text_input("…or type a token (its first token is used)", key=f"{state_key}_branch_typed")
        go = st.form_submit_button("Continue from here")
    if not go:
        return
    if len(trace.branches) >= MAX_BRANCHES:
        st.text(f"This trace already has {MAX_BRANCHES} branches, the most one trace keeps.")
        return
    child = _start_branch(trace, parent_id, step, pick, typed, live_run)
    if child is None:
        return
    # kept in session_state first: a Stop mid-branch still leaves a (partial) branch, see settle_branch
    st.session_state[state_key + "_branch"] = (child, parent_id)
    live.stream_branch(child)
    settle_branch(state_key)
    st.rerun()


def _start_branch(trace: Trace, parent_id: int, step: int, pick: int, typed: str, live_run: Run | None) -> Run | None:
    """Load the trace's model and set up the branch run; None (with the reason shown) when it cannot start."""
    try:
        config = GenerationConfig.from_dict(trace.config)
    except ValueError as exc:
        st.text(f"This trace's settings are not valid here: {exc}")
        return None
    st.text(f"Branching with the model named in the trace: {config.model}")
    lm = resources.get_model(config.model, config.dtype, config.device)
    if lm is None:
        return None
    token = pick
    if typed:
        ids = lm.tokenizer(typed, add_special_tokens=False)["input_ids"]
        if not ids:
            st.text("That text has no tokens; pick a candidate instead.")
            return None
        token = ids[0]
    prefix = [x.token_id for x in trace.path_steps(parent_id)[:step]]
    try:
        return Run.branch(
            lm,
            config,
            prefix,
            token,
            parent=live_run if parent_id == 0 else None,
            limits=resources.limits(),
            prompt_ids=trace.prompt_ids,
        )
    except (ValueError, IndexError, RuntimeError) as exc:  # a model that does not fit the trace
        st.text(f"Cannot branch here: {exc}")
        return None


def settle_branch(state_key: str) -> None:
    """Add a branch run left in session_state to its trace (finished, or cut short by Stop)."""
    pending = st.session_state.pop(state_key + "_branch", None)
    if pending is None or state_key not in st.session_state:
        return
    child, parent_id = pending
    trace, attn = st.session_state[state_key]
    new_id = max([b.id for b in trace.branches], default=0) + 1
    branches = trace.branches + [child.branch_record(new_id, parent_id)]
    st.session_state[state_key] = (trace.model_copy(update={"branches": branches}), attn)


def render_branches(trace: Trace) -> None:
    """Main run and each branch side by side, from the step where they split."""
    if not trace.branches:
        return
    st.subheader("Branches")
    for b in trace.branches:
        parent = trace.path_steps(b.parent)
        was = parent[b.at_step].label if b.at_step < len(parent) else "(end)"
        st.text(
            f"Branch {b.id} splits from {'the main run' if b.parent == 0 else f'branch {b.parent}'} at step "
            f"{b.at_step}: there it took {b.steps[0].label if b.steps else '?'} instead of {was}."
        )
        left, right = st.columns(2)
        left.caption("Parent, from the split")
        right.caption(f"Branch {b.id}, from the split")
        from .views import stream_html

        left.html(stream_html(parent[b.at_step :]))
        right.html(stream_html(b.steps))


def render_replay(trace: Trace, key: str) -> None:
    """Re-score the trace with its model and report the largest difference, per step."""
    if not st.button("Run the replay check", key=f"{key}_replay"):
        return
    try:
        config = GenerationConfig.from_dict(trace.config)
    except ValueError as exc:
        st.text(f"This trace's settings are not valid here: {exc}")
        return
    st.text(f"Replaying with the model named in the trace: {config.model}")
    lm = resources.get_model(config.model, config.dtype, config.device)
    if lm is None:
        return
    try:
        report = replay(lm, trace)
    except (ValueError, IndexError, RuntimeError) as exc:  # a model that does not fit the trace
        st.text(f"Cannot replay: {exc}")
        return
    (st.success if report.max_diff <= 1e-4 else st.warning)("Replay check finished")
    st.text(report.verdict)
    st.altair_chart(charts.replay_chart(report.per_step), width="content")

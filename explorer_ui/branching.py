"""Branches in the app: pick another candidate at a step, continue live, keep the tree in the trace.

The run itself is explorer_core's (`Run.branch`); this module holds every Streamlit part of branching:
the path picker, the torn steps under the stream (a click opens the form there), the form, the live
stream of a branch, settling a branch cut short by Stop, and the side-by-side view of each branch with
its parent.
"""

from __future__ import annotations

import streamlit as st

from explorer_core import admission, frames
from explorer_core.attnstore import AttentionStore
from explorer_core.config import GenerationConfig
from explorer_core.markup import escape_text
from explorer_core.stepper import TRACE_SLACK, Run
from explorer_core.trace import Branch, Trace

from . import live, resources
from .base import clip, schema_limit, stream_html

MAX_BRANCHES = schema_limit(Trace, "branches")  # the trace schema's limits: refused before a branch runs
MAX_BRANCH_ID = schema_limit(Branch, "id", "le")
MAX_TYPED = 100  # characters of a typed token; Streamlit cuts a longer value at max_chars on the server too
BRANCH_TAB = "Branch from here"  # the step inspector's tab holding the form
MAX_TORN_PILLS = 20  # a long sampled run can be torn at most steps: a wall of pills says nothing, the closest calls do


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


def render_torn_steps(view: Trace, step: int, key: str) -> None:
    """The path's torn steps as pills: a click inspects that step and opens the branch form at it.

    `key` is the trace view's key: its step slider is `key_step`, its tabs `key_tabs`. The pill of the
    step being inspected is lit, so the pills follow the slider and the token table too.
    """
    shown, note = torn_pills(view)
    if not shown:
        return
    labels = {s.step: s.label for s in view.steps}
    pills_key = key + "_torn"
    # set before the widget is drawn (Streamlit allows it then): the lit pill is always the inspected step
    st.session_state[pills_key] = step if step in shown else None
    st.pills(
        f"Torn steps: the model hesitated between its two best candidates. Click one to branch from it.{note}",
        shown,
        # pill labels are Markdown: the token text is escaped, and cut so a long token keeps its pill short
        format_func=lambda i: f"{i} · {escape_text(labels[i][:24])}",
        key=pills_key,
        on_change=_open_branch_form,
        args=(key, step),
        help=f"Raw entropy ≥ {frames.TORN_ENTROPY:g} bit and the two best processed candidates within "
        f"{frames.TORN_MARGIN:g} of each other; these tokens are underlined with dots in the stream above.",
    )


def torn_pills(view: Trace) -> tuple[list[int], str]:
    """The torn steps to offer as pills, in step order, and a note when not all are offered. Past
    MAX_TORN_PILLS (a run torn nearly everywhere) only the closest calls, the smallest gap between the
    two best candidates, are offered: those are where another pick most plausibly changes the text."""
    torn = [s for s in view.steps if frames.is_torn(s)]
    if len(torn) <= MAX_TORN_PILLS:
        return [s.step for s in torn], ""
    closest = sorted(torn, key=lambda s: (frames.margin(s), s.step))[:MAX_TORN_PILLS]
    most = " (most of them)" if 2 * len(torn) > len(view.steps) else ""
    note = (
        f" Torn at {len(torn)} of {len(view.steps)} steps{most}: showing the {MAX_TORN_PILLS} closest calls "
        "(smallest gap between the two best candidates); the step slider reaches the rest."
    )
    return sorted(s.step for s in closest), note


def _open_branch_form(key: str, inspected: int) -> None:
    """Pills callback: inspect the clicked step and open the branch tab (runs before the script does)."""
    picked = st.session_state.get(key + "_torn")
    # a click on the lit pill unselects it: that is a click on the step already inspected
    st.session_state[key + "_step"] = inspected if picked is None else int(picked)
    st.session_state[key + "_tabs"] = BRANCH_TAB


def render_branch_form(trace: Trace, parent_id: int, step: int, state_key: str, live_run: Run | None) -> None:
    """Pick another candidate at this step (or type a token) and continue from there."""
    s = trace.path_steps(parent_id)[step]
    # the most likely other candidates first; the token actually taken last
    options = [i for i in dict.fromkeys(s.top_proc.ids + s.top_raw.ids) if i != s.token_id] + [s.token_id]
    labels = {**dict(zip(s.top_raw.ids, s.top_raw.labels)), **dict(zip(s.top_proc.ids, s.top_proc.labels))}
    where = "the main run" if parent_id == 0 else f"branch {parent_id}"
    st.caption(
        f"Branch from step {step} of {where}: it took the token below. Pick another candidate (or type one) "
        "and the model continues from there with the same settings."
    )
    st.code(s.label, language=None)  # token text is untrusted: never through Markdown
    with st.form(key=f"{state_key}_branch_form"):
        pick = st.selectbox(
            "Candidate",
            options,
            format_func=lambda i: (
                f"{labels.get(i, s.label)}  (id {i})" + ("  — the token taken" if i == s.token_id else "")
            ),
            key=f"{state_key}_branch_pick",
        )
        typed = st.text_input(
            "…or type a token (its first token is used)", key=f"{state_key}_branch_typed", max_chars=MAX_TYPED
        )
        full_up = len(trace.branches) >= MAX_BRANCHES
        if full_up:
            st.caption(
                f"This trace already has {MAX_BRANCHES} branches, the most one trace keeps: download it, "
                "then load it again without some of them to branch further."
            )
        go = st.form_submit_button("Continue from here", disabled=full_up)
    if not go or full_up:
        return
    child = _start_branch(trace, parent_id, step, pick, typed, live_run)
    if child is None:
        return
    # kept in session_state first: a Stop mid-branch still leaves a (partial) branch, see settle_branch
    st.session_state[state_key + "_branch"] = (child, parent_id)
    stream_branch(child)
    settle_branch(state_key)
    st.rerun()


def _start_branch(trace: Trace, parent_id: int, step: int, pick: int, typed: str, live_run: Run | None) -> Run | None:
    """Load the trace's model and set up the branch run; None (with the reason shown) when it cannot start."""
    try:
        config = GenerationConfig.from_dict(trace.config)
    except ValueError as exc:
        st.text(f"This trace's settings are not valid here: {exc}")
        return None
    if admission.room(trace) < 2 * TRACE_SLACK:  # not even one step would fit: refused before loading anything
        st.text(
            "This trace is at its size limit for trace.json: download it, then load it again without some "
            "branches or explanations to branch more."
        )
        return None
    st.text(f"Branching with the model named in the trace: {clip(config.model, 80)}")
    lm = resources.get_model(config.model, config.dtype, config.device, config.device_map, fix=resources.TRACE_FIX)
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
            room=admission.room(trace),
        )
    except (ValueError, IndexError, RuntimeError) as exc:  # a model that does not fit the trace
        st.text(f"Cannot branch here: {clip(str(exc))}")
        return None


def settle_branch(state_key: str) -> None:
    """Add a branch run left in session_state to its trace (finished, or cut short by Stop)."""
    pending = st.session_state.pop(state_key + "_branch", None)
    if pending is None or state_key not in st.session_state:
        return
    child, parent_id = pending
    trace, attn = st.session_state[state_key]
    if len(trace.branches) >= MAX_BRANCHES:  # the form refuses first; never store a trace that does not validate
        return
    branches = trace.branches + [child.branch_record(next_branch_id(trace), parent_id)]
    st.session_state[state_key] = (trace.model_copy(update={"branches": branches}), attn)


def next_branch_id(trace: Trace) -> int:
    """The next id after the highest; past the schema's 1000 (a loaded trace may use it), the lowest free one.
    A trace holds at most 64 branches, so a free id always exists."""
    used = {b.id for b in trace.branches}
    nxt = max(used, default=0) + 1
    return nxt if nxt <= MAX_BRANCH_ID else next(i for i in range(1, MAX_BRANCH_ID + 1) if i not in used)


def render_branches(trace: Trace) -> None:
    """Main run and each branch side by side, from the step where they split."""
    if not trace.branches:
        return
    st.subheader("Branches")
    for b in trace.branches:
        parent = trace.path_steps(b.parent)
        was = parent[b.at_step].label if b.at_step < len(parent) else "(end)"
        kept_on = f", with this change kept on: {b.intervention}" if b.intervention else ""
        st.text(
            f"Branch {b.id} splits from {'the main run' if b.parent == 0 else f'branch {b.parent}'} at step "
            f"{b.at_step}{kept_on}: there it took {b.steps[0].label if b.steps else '?'} instead of {was}."
        )
        left, right = st.columns(2)
        left.caption("Parent, from the split")
        right.caption(f"Branch {b.id}, from the split")
        left.html(stream_html(parent[b.at_step :]))
        right.html(stream_html(b.steps))


def stream_branch(run: Run) -> None:
    """Generate a branch under the lock, with the same live stream as the main run."""
    lock = resources.acquire_generation_slot(st.empty())
    try:
        live.stream_run(run, run.config)
    finally:
        lock.release()

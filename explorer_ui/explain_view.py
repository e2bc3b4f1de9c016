"""'Why this token?': explain one step on request (input attribution, component breakdown) and the uncertainty lane.

Nothing here runs while generating: the model is asked only when the user presses Explain. Results live in
the session (per trace, path and step) and can be kept in the trace, so they come back when it is reloaded.
"""

from __future__ import annotations

import time

import streamlit as st

from explorer_core import admission, charts, frames
from explorer_core.explain import FAST_METHODS, IG_STEPS, METHOD_NAMES, ExplainError, explain
from explorer_core.trace import MAX_TRACE_BYTES, Explanation, Trace

from . import resources
from .base import clip, escape_text, schema_limit

RESULTS = "explain_results"  # session entry: {(trace id, branch, step): Explanation}, newest last
MAX_EXPLANATIONS = schema_limit(Trace, "explanations")  # what one trace may keep
# characters of a typed contrast: one token's text or its id, never a document. Streamlit cuts a longer
# value at max_chars on the server too (the browser shows the count), so no echo or tokenizer sees more.
MAX_TYPED = 100


def _trace_id(trace: Trace) -> tuple:
    return (trace.created, trace.input_text, trace.output_text)


def current(trace: Trace, branch: int, step: int) -> Explanation | None:
    """The newest explanation of this step: made in this session, else kept in the trace."""
    made = st.session_state.get(RESULTS, {}).get((_trace_id(trace), branch, step))
    if made is not None:
        return made
    kept = [e for e in trace.explanations if e.branch == branch and e.step == step]
    return kept[-1] if kept else None


def render_explain(trace: Trace, branch: int, step: int, key: str, state_key: str | None = None) -> None:
    """The step inspector's 'Why this token?' tab: controls, then the explanation of this step if there is one."""
    s = trace.path_steps(branch)[step]
    labels = {**dict(zip(s.top_raw.ids, s.top_raw.labels)), **dict(zip(s.top_proc.ids, s.top_proc.labels))}
    options = [i for i in dict.fromkeys(s.top_proc.ids + s.top_raw.ids) if i != s.token_id]
    st.caption(
        f"Why this token (step {step}, shown below) and not another? Explain recomputes the step with the trace's "
        "model: which earlier positions pushed the chosen token's logit against the contrast, and how the "
        "embedding, each head and each MLP add up to the logit difference."
    )
    st.code(s.label, language=None)  # token text is untrusted: never through Markdown
    with st.form(key=f"{key}_explain_form"):
        pick = st.selectbox(
            "Contrast token",
            options or [None],
            format_func=lambda i: "(no other candidate recorded)" if i is None else f"{labels.get(i, '?')}  (id {i})",
            key=f"{key}_explain_pick",
        )
        typed = st.text_input(
            "…or type one token exactly, a leading space included (or its id)",
            key=f"{key}_explain_typed",
            max_chars=MAX_TYPED,
            help=TYPED_HELP,
        )
        with_ig = st.checkbox(
            "Also integrated gradients (slower: on 2 CPU cores about 30 s at 50 prompt tokens, 11 min at 500)",
            key=f"{key}_explain_with_ig",
            help="Gradient × input and attention-aware LRP take one backward pass each. Integrated gradients "
            "refines its path until its scores add up to the change from the baseline.",
        )
        cap = resources.limits().max_ig_passes
        ig_steps = st.number_input(
            "Integrated gradients: most gradient passes",
            4,
            max(4, cap),
            min(IG_STEPS, max(4, cap)),
            step=4,
            key=f"{key}_explain_ig_steps",
            help="Integrated gradients refines its path where the scores do not yet add up, and stops "
            f"once they do (within 4 %) or after this many passes. Each pass costs about one backward. "
            f"This host allows {cap} (EXPLORER_MAX_IG_PASSES).",
        )
        go = st.form_submit_button("Explain")
    if go:
        methods = FAST_METHODS + (("integrated_gradients",) if with_ig else ())
        _run(trace, branch, step, _contrast(typed, pick), int(ig_steps), methods)
    result = current(trace, branch, step)
    if result is not None:
        render_result(result, key, trace)
        _keep_button(trace, result, key, state_key)
    render_uncertainty(trace.model_copy(update={"steps": trace.path_steps(branch)}), step)


TYPED_HELP = (
    "ASCII digits are a token id; anything else is the token's text exactly as typed, leading space "
    f"included: ' Paris' and 'Paris' are different tokens (at most {MAX_TYPED} characters). The token used "
    "is shown with its id above the results."
)


def _contrast(typed: str, pick):
    """The typed contrast as an id (ASCII digits only: "٣" is text, not id 3), as text, or else the pick.

    Text is kept as typed: stripping it turned " Ag" into "Ag", another token, and made " Paris" untypable."""
    if not typed:
        return pick
    bare = typed.strip()
    return int(bare) if bare and bare.isascii() and bare.isdigit() else typed


def _run(trace: Trace, branch: int, step: int, contrast, ig_steps: int, methods: tuple[str, ...]) -> None:
    if contrast is None:
        st.text("Type a contrast token: this step recorded no other candidate.")
        return
    limits = resources.limits()
    try:
        limits.check_explain(ig_steps if "integrated_gradients" in methods else 0)
    except ValueError as exc:
        st.error(str(exc))  # our own words and numbers only
        return
    lm = resources.model_for_trace(trace, "explain")
    if lm is None:
        return
    try:
        with resources.model_job(), st.spinner("Explaining: one forward for the breakdown, then the gradients…"):
            cancel = stop_check(time.monotonic() + limits.max_explain_s, limits.max_explain_s)
            result = explain(lm, trace, step, contrast, branch, methods, ig_steps, cancel=cancel)
    except (ExplainError, ValueError, RuntimeError) as exc:  # a model that does not fit, a bad token, a stop
        st.text(f"Cannot explain this step: {clip(str(exc))}")
        return
    st.session_state.setdefault(RESULTS, {})[(_trace_id(trace), branch, step)] = result


def stop_check(deadline: float, limit_s: int):
    """explain()'s cancel: asked between passes, it stops work nobody is waiting for any more.

    Touching session state is a Streamlit yield point: a Stop, a rerun, or a closed tab (its session's
    script is asked to stop) raises there, between two passes, and model_job frees the slot. Past the
    host's time limit it returns the reason, and explain raises Cancelled with it."""

    def check() -> str | None:
        st.session_state.get(RESULTS)
        if time.monotonic() > deadline:
            return (
                f"it ran past this host's limit of {limit_s} s per explanation (EXPLORER_MAX_EXPLAIN_S): "
                "allow fewer integrated-gradients passes, or explain a shorter sequence"
            )
        return None

    return check


def _keep_button(trace: Trace, result: Explanation, key: str, state_key: str | None) -> None:
    if state_key is None or result in trace.explanations:
        return
    full, _ = st.session_state[state_key]
    full_up = len(full.explanations) >= MAX_EXPLANATIONS  # refused before: a 65th would not validate
    if full_up:
        st.caption(
            f"This trace already keeps {MAX_EXPLANATIONS} explanations, the most one trace holds: "
            "download it, then load it again without some of them to keep more."
        )
    elif len(result.model_dump_json()) + 1 > admission.room(full):  # the trace must stay savable
        full_up = True
        st.caption(
            f"Keeping this explanation would take the trace past the {MAX_TRACE_BYTES / 2**20:.0f} MiB limit for "
            "trace.json: download it, then load it again without some branches or explanations to keep more."
        )
    clicked = st.button(
        "Keep this explanation in the trace (saved with it)", key=f"{key}_explain_keep", disabled=full_up
    )
    if clicked and not full_up:
        full, attn = st.session_state[state_key]
        st.session_state[state_key] = (full.model_copy(update={"explanations": full.explanations + [result]}), attn)
        st.rerun()


def score_stream_html(labels: list[str], scores: list[float]) -> str:
    """Tokens shaded by score: red pushes towards the chosen token, blue towards the contrast."""
    top = max((abs(v) for v in scores), default=0.0) or 1.0
    spans = []
    for i, (label, v) in enumerate(zip(labels, scores)):
        alpha = 0.05 + 0.75 * abs(v) / top
        rgb = "214,39,40" if v > 0 else "31,119,180"
        tip = escape_text(f"position {i}: {label}  score {v:+.4f}")
        spans.append(
            f'<span title="{tip}" style="background: rgba({rgb},{alpha:.2f}); border-radius: 3px; '
            f'padding: 1px 2px; margin: 1px; display: inline-block; font-family: monospace;">'
            f"{escape_text(label)}</span>"
        )
    return '<div style="line-height: 1.9;">' + "".join(spans) + "</div>"


def render_result(e: Explanation, key: str, trace: Trace | None = None) -> None:
    """One explanation: its checks and input attribution, then the component breakdown, each in a keyed container
    (`st-key-<key>_explain_inputs`, `..._components`) that the browser test photographs for the README."""
    with st.container(key=f"{key}_explain_inputs"):
        _render_checks(e)
        if e.inputs.methods:
            _render_inputs(e, key)
            _render_method_sums(e)
    with st.container(key=f"{key}_explain_components"):
        _render_components(e, key, trace)


def _render_checks(e: Explanation) -> None:
    """The logit difference against the sum of its parts, and how complete each attribution method is."""
    checks = e.checks
    # ids as well as labels: two tokens can share a label, and a typed contrast must show which token it became
    st.text(
        f"Step {e.step}: chosen '{e.target.label}' (id {e.target.id}) over contrast '{e.contrast.label}' "
        f"(id {e.contrast.id}); ␣ is a space, ↵ a newline.\n"
        f"The logit difference {e.logit_diff:.4f}; "
        f"embedding + heads + MLPs + biases = {checks.get('sum_of_parts', float('nan')):.4f}"
    )
    errors = [
        f"{_method_label(m)} completeness error {checks[f'{m}_completeness_error']:.1%}"
        for m in e.inputs.methods
        if f"{m}_completeness_error" in checks
    ]
    notes = []
    if "integrated_gradients" in e.inputs.methods:
        # the baseline's words come from the file: escaped, or a kept explanation could load images and links
        notes.append(f"Integrated gradients: {e.inputs.ig_steps} gradient passes from {escape_text(e.inputs.baseline)}")
    if "final_softcap" in checks:
        notes.append(
            f"the model soft-caps its logits at {checks['final_softcap']:g}: the split is of the difference before "
            f"the cap; after it the model's difference is {checks['capped_logit_diff']:.4f}"
        )
    if "logit_scale" in checks:
        notes.append(f"the model scales its head's logits by {checks['logit_scale']:.4g}: the parts include it")
    if "attn_lrp_sum" in checks:
        notes.append(
            f"attention-aware LRP's scores add up to {checks['attn_lrp_sum']:.3f} against the logit difference "
            f"{e.logit_diff:.3f} (AttnLRP is not exactly conservative: the softmax keeps a share)"
        )
    st.caption("; ".join(notes + errors) + f". Took {sum(e.timing_s.values()):.1f} s.")
    worst = max((checks.get(f"{m}_completeness_error", 0.0) for m in e.inputs.methods), default=0.0)
    if worst > 0.05:
        st.warning(
            f"Integrated gradients' scores add up to f(input) - f(baseline) only within {worst:.0%} (aim: 5 %): "
            "treat them as rough and allow more gradient passes."
        )


def _method_label(m: str) -> str:
    """A method's name for Markdown labels: a kept explanation's method names come from the file."""
    return escape_text(METHOD_NAMES.get(m, m))


def _render_inputs(e: Explanation, key: str) -> None:
    """Input attribution: the tokens shaded by one method's scores, and each method's top positions."""
    method = st.radio(
        "Shade the tokens by",
        list(e.inputs.methods),
        format_func=_method_label,  # radio labels are Markdown
        horizontal=True,
        key=f"{key}_explain_method",
    )
    st.caption(_colour_legend(e))
    st.html(score_stream_html(e.inputs.labels, e.inputs.methods[method]))
    _attribution_charts(e)


def _colour_legend(e: Explanation) -> str:
    """What red, blue, shade and score mean, in the page's words (labels come from files: escaped)."""
    chosen, other = escape_text(e.target.label), escape_text(e.contrast.label)
    return (
        f"Red: the position pushes towards the chosen token {chosen}; blue: towards the contrast {other}. "
        "The stronger the shade, the larger the score against this method's largest. A score is in logits: "
        "that position's part of logit(chosen) − logit(contrast), summed over the embedding. "
        "Hover a token for its score."
    )


ATTRIBUTION_BARS = 15  # positions per method's chart
PER_ROW = 3  # methods side by side; a kept explanation may name more (read from its file): further rows
# bar area per chart by how many share the row; the axis labels (clipped by attribution_frame) add up to
# about 120 px. Three charts must fit a third of a 1,280 px window's main column with the sidebar open.
CHART_WIDTH = {1: 260, 2: 260, 3: 120}


def attribution_charts(e: Explanation) -> list:
    """One chart per method, its bar area set by how many share its row."""
    frame = frames.attribution_frame(e)
    methods = list(e.inputs.methods)
    width = CHART_WIDTH[min(len(methods), PER_ROW)]
    out = []
    for method in methods:
        chart = charts.attribution_chart(frame[frame["method"] == method], top=ATTRIBUTION_BARS)
        chart.spec.width = width  # the facet's one panel (FacetChart.spec): charts.py fixes 260 for two
        out.append(chart)
    return out


def _attribution_charts(e: Explanation) -> None:
    """Each method's chart in its own column: one faceted chart of three methods (integrated gradients
    ticked) was wider than the tab; columns also stack on a narrow screen."""
    drawn = attribution_charts(e)
    for first in range(0, len(drawn), PER_ROW):
        row = drawn[first : first + PER_ROW]
        for col, chart in zip(st.columns(min(len(drawn), PER_ROW)), row):
            col.altair_chart(chart, width="content")


# what each method measures and whether its scores add up to the difference: the methods can rank the
# same token first and last, and the reader needs to know which ranking is an accounting
METHOD_MEANING = {
    "grad_x_input": "Gradient × input: the slope of the difference at this input times the input, a local "
    "first-order estimate. Not complete: its sum need not match the difference, so its ranking is a slope, "
    "not a share.",
    "attn_lrp": "Attention-aware LRP: the difference passed back layer by layer with rules that keep its "
    "total. Nearly complete: the attention softmax keeps a share, so the sum is close to the difference.",
    "integrated_gradients": "Integrated gradients: gradients averaged on a path from the baseline to the "
    "input. Complete: its sum is f(input) − f(baseline), which differs from the difference above by "
    "the baseline's own difference.",
}


def _render_method_sums(e: Explanation) -> None:
    """Each method's sum against the logit difference, and a sentence on what each measures."""
    st.caption("What each method measures, and whether its scores add up to the logit difference:")
    sums = frames.method_sums_frame(e)
    known = [m in METHOD_MEANING for m in e.inputs.methods]
    st.dataframe(
        sums[known],
        hide_index=True,
        column_config={
            "sum of scores": st.column_config.NumberColumn(format="%+.3f"),
            "logit difference": st.column_config.NumberColumn(format="%+.3f"),
            "sum / difference": st.column_config.NumberColumn(format="%.2f"),
        },
    )
    # a kept explanation may name a method this app never made (read from its file): its name and sum
    # go through st.text with the sentences, never into a table or Markdown
    lines = [
        METHOD_MEANING[m] if ok else f"{m!r}: not a method this app makes; its scores sum to {total:+.3f}."
        for m, ok, total in zip(e.inputs.methods, known, sums["sum of scores"])
    ]
    st.text("\n".join(lines))


def _render_components(e: Explanation, key: str, trace: Trace | None) -> None:
    """The logit difference split into the embedding, each head and each MLP: top 10 and the full heatmap."""
    left, right = st.columns([1, 2])
    top = frames.top_components_frame(e, 10)
    left.caption(
        f"Top 10 components. Amount: logits added to the difference {e.logit_diff:+.2f}; share: amount ÷ "
        "difference (parts of opposite sign cancel, so a share can pass 1 or go below 0)."
    )
    left.dataframe(
        top[["component", "amount", "share"]],
        hide_index=True,
        column_config={
            "amount": st.column_config.NumberColumn(format="%+.4f"),
            "share": st.column_config.NumberColumn(format="percent"),
        },
    )
    with left:
        _open_in_attention(top, key, trace)
    right.altair_chart(
        charts.components_chart(frames.components_frame(e), "Each head's and MLP's part of the logit difference"),
        width="content",
    )
    right.caption(
        "Red: the part raises the chosen token's logit over the contrast's; blue: the other way; white: "
        "none. Colour and tooltip are logits (amounts, not shares)."
    )


def _open_in_attention(top, key: str, trace: Trace | None) -> None:
    """A head of the top 10 opens in the Attention tab: its layer and head picked there, the tab switched.

    Done in a button callback: callbacks run before the script, when the Attention tab's widgets (drawn
    before this tab) may still take new values. Keys are attention_view.head_choice's under render_trace's
    `key + "_attn"`, and render_trace's tabs' `key + "_tabs"`."""
    heads = top.dropna(subset=["head"])
    if trace is None or heads.empty:
        return
    if trace.attention is None:
        st.caption("This run recorded no attention, so a head cannot be opened in the Attention tab.")
        return
    choice = st.selectbox("Head to look at", list(heads["component"]), key=f"{key}_explain_open_pick")
    row = heads[heads["component"] == choice].iloc[0]
    st.button(
        "Open in Attention",
        key=f"{key}_explain_open",
        on_click=_show_head,
        args=(key, int(row["layer"]), int(row["head"])),
        help="Picks this layer and head in the Attention tab and switches to it.",
    )


def _show_head(key: str, layer: int, head: int) -> None:
    st.session_state[f"{key}_attn_layer"] = layer
    st.session_state[f"{key}_attn_head"] = f"head {head}"
    st.session_state[f"{key}_tabs"] = "Attention"


def render_uncertainty(view: Trace, step: int) -> None:
    frame = frames.uncertainty_frame(view)
    st.altair_chart(charts.uncertainty_chart(frame, selected=step, width="container"), width="stretch")
    torn = frame.loc[frame["torn"], "step"].tolist()
    st.caption(
        f"Torn steps (raw entropy ≥ {frames.TORN_ENTROPY:g} bit and the two best processed candidates within "
        f"{frames.TORN_MARGIN:g} of each other): {', '.join(map(str, torn)) or 'none'}; click one under the token "
        "stream to branch from it. Varentropy is the "
        "variance of the raw distribution's surprisal (missing in traces made before it was recorded)."
    )


def render_heads_breakdown(trace: Trace, step: int, branch: int = 0) -> None:
    """For the Heads page: the layers x heads (+ MLP) breakdown of this step, once it has been explained."""
    result = current(trace, branch, step)
    if result is None:
        st.caption(f"Step {step} has not been explained yet: press Explain in the step inspector's 'Why this token?'.")
        return
    title = f"Step {step}: each head's and MLP's share of logit({result.target.label}) - logit({result.contrast.label})"
    st.altair_chart(charts.components_chart(frames.components_frame(result), title), width="content")

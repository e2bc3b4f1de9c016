"""Compare page: two models, or one model with two settings, on the same prompt and seed."""

import streamlit as st

from explorer_core import charts
from explorer_core.compare import agreement, divergence_frame, processed_divergence_frame, same_tokenizer
from explorer_ui import frame, live, resources, sidebar, views

config = frame.page("Compare models")
st.title("Compare two runs")
if config is None:
    st.info("Fix the settings in the sidebar first.")
    st.stop()
st.caption("Run A uses the sidebar. Run B uses the same prompt, seed and settings, except what you change here.")
c1, c2, c3 = st.columns(3)
SAME = "Same as A"
b_choice = c1.selectbox("Model B", [SAME] + sidebar.PRESETS, key="compare_model_choice")
if b_choice == sidebar.OTHER:
    b_model = c1.text_input("Hub id or folder for B", key="compare_model_custom")
else:
    b_model = config.model if b_choice == SAME else b_choice
b_temp = c2.slider("Temperature B", 0.0, 5.0, float(config.temperature), 0.05, key="compare_temperature")
b_top_p = c3.slider("Top-p B", 0.01, 1.0, float(config.top_p), 0.01, key="compare_top_p")

stopped = [name for name in "ab" if f"compare_{name}_run" in st.session_state]  # cut short by Stop or a widget
for key in ("compare_a", "compare_b"):
    live.settle(key + "_run", key + "_trace")


def divergence(lm_a, lm_b, config_b):
    """(frame, first differing step, what was compared), or None when the steps cannot be aligned."""
    trace_a = st.session_state["compare_a_trace"][0]
    if lm_a is lm_b:  # one model: the raw distributions are the same, only the rules differ
        return (*processed_divergence_frame(trace_a, lm_a, config, config_b), "processed")
    if same_tokenizer(lm_a, lm_b):
        return (*divergence_frame(trace_a, lm_a, lm_b), "raw")
    return None


go_col, stop_col, _ = st.columns([1, 1, 6])
go = go_col.button("Run both", type="primary", key="compare_go")
# any click interrupts the running script; the runs left in session_state are settled above, partial.
# Off while nothing runs: a Stop that can be pressed then does nothing.
stop_slot = stop_col.empty()
stop_slot.button("Stop", key="compare_stop", help="Ends the runs now and keeps what was generated.", disabled=not go)
if stopped:
    st.info(
        f"Stopped during run {stopped[0].upper()}: the steps generated so far are kept"
        + ("; run B did not start." if stopped[0] == "a" else ".")
    )
if go:
    try:
        config_b = config.replace(model=b_model or config.model, temperature=b_temp, top_p=b_top_p)
    except ValueError as exc:
        st.text(str(exc))
        st.stop()
    lm_a = resources.get_model(config.model, config.dtype, config.device, config.device_map)
    lm_b = resources.get_model(config_b.model, config_b.dtype, config_b.device, config_b.device_map)
    if lm_a is not None and lm_b is not None:
        for old in ("compare_div", "compare_a_trace", "compare_b_trace"):  # never show a new A beside an old B
            st.session_state.pop(old, None)
        st.session_state["compare_configs"] = (config, config_b)
        try:
            live.generate_live(lm_a, config, "compare_a_run", "compare_a_trace")
            live.generate_live(lm_b, config_b, "compare_b_run", "compare_b_trace")
            st.session_state["compare_div"] = divergence(lm_a, lm_b, config_b)
        except ValueError as exc:
            st.error("Could not run both")
            st.text(str(exc))
    stop_slot.button("Stop", key="compare_stop_idle", disabled=True)  # the runs are over: Stop turns off now


def render_divergence(div) -> None:
    if div is None:
        st.warning(
            "The two models use different tokenizers, so their steps cannot be aligned; "
            "showing both runs side by side only."
        )
        return
    frame_, first, kind = div
    if kind == "processed":
        st.subheader("Step-aligned: run B's rules applied on run A's tokens")
        st.text(
            "Both runs use the same model, so their raw distributions are identical at every step.\n"
            "Plotted: how far apart the distributions are after each run's rules (temperature, top-p, ...)."
        )
        title = "How far run B's processed distribution is from run A's, per step"
    else:
        st.subheader("Step-aligned: model B scored on model A's tokens")
        title = "How far model B is from model A, per step"
    (trace_a, _), (trace_b, _) = st.session_state["compare_a_trace"], st.session_state["compare_b_trace"]
    st.text("\n".join(agreement(trace_a, trace_b, *st.session_state["compare_configs"], first, kind)))
    if frame_["value"].max() == 0.0:
        st.text("The two distributions are identical at every step: nothing to plot but zeros.")
    st.altair_chart(charts.divergence_chart(frame_, first, title=title))


def render_runs() -> None:
    """Each run that exists side by side (one only when Stop came before run B started)."""
    runs = [
        (n, st.session_state[f"compare_{n.lower()}_trace"])
        for n in "AB"
        if f"compare_{n.lower()}_trace" in st.session_state
    ]
    if "compare_div" in st.session_state and len(runs) == 2:
        render_divergence(st.session_state["compare_div"])
    for col, (name, (trace, attn)) in zip(st.columns(2), runs):
        with col:
            st.subheader(f"Run {name}")
            st.text(f"{trace.model.name} · temperature {trace.config['temperature']} · top-p {trace.config['top_p']}")
            views.render_summary(trace)
            views.render_output(trace.steps, f"compare_{name}")
            if trace.steps:
                step = views.pick_step(trace, f"compare_{name}_step")
                views.render_step(trace, step, narrow=True)
                views.render_attention(trace, attn, step, f"compare_{name}_attn", narrow=True)
                views.render_timeline(trace, step, narrow=True)


if "compare_a_trace" in st.session_state:
    render_runs()

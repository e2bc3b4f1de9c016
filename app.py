"""Model Interpret Explorer, first page (Generate): type a prompt, watch tokens arrive, then inspect any step.

Run with `streamlit run app.py`; the other pages are the files in pages/ (Streamlit's classic layout).
"""

import time

import streamlit as st

from explorer_ui import frame, live, resources, views

RUN, TRACE = "gen_run", "gen_trace"

config = frame.page("Generate")
st.title("Watch a model write")
live.settle(RUN, TRACE, keep_live=True)  # a run cut short by Stop or a widget change becomes a partial trace
c1, c2, _ = st.columns([1, 1, 4])
go = c1.button("Generate", type="primary", key="gen_generate", disabled=config is None)
running = go and config is not None
# on only while this script generates: a Stop with nothing to stop did nothing, which read as broken
stop_slot = c2.empty()
stop_slot.button("Stop", key="gen_stop", help="Ends the run now and keeps what was generated.", disabled=not running)

if config is None:
    st.error("The settings in the sidebar are not valid (the reason is shown there); Generate is off until they are.")
else:
    if not config.prompt.strip():
        st.info(views.empty_prompt_note(config))
# one slot, drawn again once a run has loaded the model: the estimate is then exact in this same rerun
estimate_slot = st.empty()


def show_estimate() -> None:
    if config is not None:
        lm_now = resources.loaded_already(config.model, config.dtype, config.device, config.device_map)
        with estimate_slot.container():
            views.render_cost_estimate(config, lm_now, resources.limits())


show_estimate()


def show_trace() -> None:
    """The session's latest trace with every view, or what to do first."""
    if TRACE in st.session_state:
        if st.session_state[TRACE][0].stop_reason == "interrupted":
            st.warning("Run stopped early: showing the partial trace.")
            if st.session_state.get(TRACE + "_why"):
                st.text(st.session_state[TRACE + "_why"])
        views.render_trace(TRACE, "gen", live_run=st.session_state.get(TRACE + "_live"))
    elif not go and config is not None:
        st.info("Set the prompt and sampling controls in the sidebar, then press Generate.")


# The model's load notice and the live run go in one slot that every run draws (empty when not generating),
# so the views below keep their places: an element added or removed above st.tabs remounts it, and a
# remounted tab bar could miss the switch to "Branch from here" asked for by a click on a torn step.
live_slot = st.container()
# The trace's views go in a slot of their own, drawn empty while a run goes: the previous run's output
# does not stay on screen, greyed out, under the live stream.
trace_slot = st.empty()
if running:
    with live_slot:
        started = time.perf_counter()
        lm = resources.get_model(config.model, config.dtype, config.device, config.device_map)
        if lm is not None:
            try:  # this run's own wait for the model (near 0 once loaded), not the server's first load
                live.generate_live(lm, config, RUN, TRACE, keep_live=True, load_s=time.perf_counter() - started)
            except ValueError as exc:
                st.error("Could not start the run")
                st.text(str(exc))
    # the run is over: Stop turns off now, not at the next rerun (a widget key is used once per run)
    stop_slot.button("Stop", key="gen_stop_idle", disabled=True)
    show_estimate()  # the model is loaded now: the prompt's length in tokens is exact

with trace_slot.container():
    show_trace()

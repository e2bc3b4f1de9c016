"""Generate page: type a prompt, press Generate, watch tokens arrive, then inspect any step."""

import streamlit as st

from explorer_ui import live, resources, views

RUN, TRACE = "gen_run", "gen_trace"

st.title("Watch a model write")
live.settle(RUN, TRACE, keep_live=True)  # a run cut short by Stop or a widget change becomes a partial trace
config = st.session_state.get("config")
c1, c2, _ = st.columns([1, 1, 4])
go = c1.button("Generate", type="primary", key="gen_generate", disabled=config is None)
c2.button("Stop", key="gen_stop", help="Ends the run now and keeps what was generated.")

if config is not None:
    views.render_cost_estimate(
        config,
        resources.loaded_already(config.model, config.dtype, config.device, config.device_map),
        resources.limits(),
    )

if go and config is not None:
    lm = resources.get_model(config.model, config.dtype, config.device, config.device_map)
    if lm is not None:
        try:
            live.generate_live(lm, config, RUN, TRACE, keep_live=True)
        except ValueError as exc:
            st.error("Could not start the run")
            st.text(str(exc))

if TRACE in st.session_state:
    trace, attn = st.session_state[TRACE]
    if trace.stop_reason == "interrupted":
        st.warning("Run stopped early: showing the partial trace.")
    if go and TRACE + "_wall" in st.session_state:
        n, wall = st.session_state[TRACE + "_wall"]
        st.caption(f"Generated {n} tokens in {wall:.2f} s wall-clock, live display included ({n / wall:.1f} tokens/s).")
    views.render_trace(trace, attn, "gen", state_key=TRACE, live_run=st.session_state.get(TRACE + "_live"))
elif not go:
    st.info("Set the prompt and sampling controls in the sidebar, then press Generate.")

"""Trace viewer page: reload a saved trace (upload or example) and see every view of the Generate page."""

import streamlit as st

from explorer_core import trace as trace_io
from explorer_core.trace import TraceError
from explorer_ui import loading, views

TRACE = "viewer_trace"

st.title("Trace viewer")
src = st.radio("Source", ["Examples", "Upload"], horizontal=True, key="viewer_source")
try:
    if src == "Upload":
        # No `type=`: Streamlit would raise its own exception box for a wrong extension; the loader
        # checks names itself and says plainly what it accepts.
        files = st.file_uploader(
            "trace.json with its .attn.npz companion, or a trace.zip", accept_multiple_files=True, key="viewer_upload"
        )
        if files:
            sig = tuple((f.name, f.size) for f in files)
            if st.session_state.get("viewer_loaded") != sig:
                st.session_state[TRACE] = loading.from_uploads(files)
                st.session_state["viewer_loaded"] = sig
    else:
        examples = loading.example_traces()
        if examples:
            name = st.selectbox("Example run", list(examples), key="viewer_example")
            if st.session_state.get("viewer_loaded") != name:
                st.session_state[TRACE] = trace_io.load(examples[name])
                st.session_state["viewer_loaded"] = name
        else:
            st.info("No example traces found in examples/.")
except TraceError as exc:
    st.error("This file cannot be shown; the trace on screen (if any) is unchanged.")
    st.text(str(exc))

if TRACE in st.session_state:
    trace, attn = st.session_state[TRACE]
    views.render_trace(trace, attn, "viewer", state_key=TRACE)

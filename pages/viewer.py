"""Trace viewer page: reload a saved trace (upload or example) and see every view of the Generate page."""

import streamlit as st

from explorer_core import trace as trace_io
from explorer_core.trace import TraceError
from explorer_ui import frame, loading, views

TRACE, SOURCE, KEPT = "viewer_trace", "viewer_source", "viewer_source_kept"

frame.page("Trace viewer")
st.title("Trace viewer")
# Streamlit forgets a widget's value once its page is left; a plain key keeps the choice, so coming
# back to an uploaded trace never swaps in an example.
st.session_state[SOURCE] = st.session_state.get(KEPT, "Examples")
src = st.radio(
    "Source",
    ["Examples", "Upload"],
    horizontal=True,
    key=SOURCE,
    on_change=lambda: st.session_state.update({KEPT: st.session_state[SOURCE]}),
)


def load_uploads() -> None:
    cap = loading.upload_cap_mb()
    # No `type=`: Streamlit would raise its own exception box for a wrong extension; the loader
    # checks names itself and says plainly what it accepts.
    files = st.file_uploader(
        "trace.json with its .attn.npz companion, or a trace.zip",
        accept_multiple_files=True,
        key="viewer_upload",
        max_upload_size=cap,
    )
    st.caption(
        f"Files over {cap} MB are refused before they reach the app (a red chip in the list above). "
        "The limit is Streamlit's server.maxUploadSize (STREAMLIT_SERVER_MAX_UPLOAD_SIZE)."
    )
    if not files:
        return
    skipped = loading.unusable(files)
    if skipped and len(skipped) < len(files):
        st.warning(f"Left out (not a trace.json, .attn.npz or .zip): {', '.join(skipped)}")
    sig = tuple((f.name, f.size) for f in files)
    if st.session_state.get("viewer_loaded") == sig:
        return
    trace, attn = loading.from_uploads(files)
    st.session_state[TRACE] = (trace, attn)
    st.session_state["viewer_loaded"] = sig
    if trace.attention is not None and attn is None:
        st.session_state["viewer_note"] = (
            f"No attention companion (.attn.npz) arrived with this trace. If you added one, it may be over "
            f"the {cap} MB upload limit and refused by the uploader: upload the trace.zip, or raise the limit."
        )
    else:
        st.session_state.pop("viewer_note", None)


def load_example() -> None:
    examples = loading.example_traces()
    if not examples:
        st.info("No example traces found in examples/.")
        return
    name = st.selectbox("Example run", list(examples), key="viewer_example")
    if st.session_state.get("viewer_loaded") != name:
        st.session_state[TRACE] = trace_io.load(examples[name])
        st.session_state["viewer_loaded"] = name
        st.session_state.pop("viewer_note", None)


try:
    if src == "Upload":
        load_uploads()
    else:
        load_example()
except TraceError as exc:
    st.error("This file cannot be shown; the trace on screen (if any) is unchanged.")
    st.text(str(exc))

if "viewer_note" in st.session_state:
    st.warning(st.session_state["viewer_note"])
if TRACE in st.session_state:
    views.render_trace(TRACE, "viewer")

"""Trace viewer page: reload a saved trace (upload or example) and see every view of the Generate page."""

import streamlit as st

from explorer_core import tracefile
from explorer_core.trace import TraceError
from explorer_ui import loading, resources, views

TRACE = "viewer_trace"

st.title("Trace viewer")
hosted = resources.limits().hosted
sources = ["Examples", "Upload"] if hosted else ["Examples", "Upload", "Saved runs"]
src = st.radio("Source", sources, horizontal=True, key="viewer_source")


def keep(loaded) -> None:
    """Show a newly loaded trace; the temporary files of the one it replaces are removed."""
    old = st.session_state.get(TRACE)
    st.session_state[TRACE] = loaded
    if old is not None and old[1] is not loaded[1]:
        loading.forget(old[1])


try:
    if src == "Upload":
        # No `type=`: Streamlit would raise its own exception box for a wrong extension; the loader
        # checks names itself and says plainly what it accepts.
        files = st.file_uploader(
            "trace.json with its .attn.safetensors companion, or a trace.zip",
            accept_multiple_files=True,
            key="viewer_upload",
        )
        if files:
            sig = tuple((f.name, f.size) for f in files)
            if st.session_state.get("viewer_loaded") != sig:
                keep(loading.from_uploads(files))
                st.session_state["viewer_loaded"] = sig
    elif src == "Examples":
        examples = loading.example_traces()
        if examples:
            name = st.selectbox("Example run", list(examples), key="viewer_example")
            if st.session_state.get("viewer_loaded") != name:
                keep(tracefile.load(examples[name]))
                st.session_state["viewer_loaded"] = name
        else:
            st.info("No example traces found in examples/.")
    elif src == "Saved runs":  # local only: a public host never reads paths its visitors type
        folder = st.text_input("Folder of saved runs", "runs", key="viewer_folder")
        found = sorted(p for p in loading.Path(folder).expanduser().glob("**/trace.json"))[:200]
        if found:
            pick = st.selectbox("Run", [str(p) for p in found], key="viewer_run")
            if st.session_state.get("viewer_loaded") != pick:
                keep(tracefile.load(pick))
                st.session_state["viewer_loaded"] = pick
        else:
            st.info(f"No trace.json under {folder!r}: the command line writes runs there with --out_dir.")
except TraceError as exc:
    st.error("This file cannot be shown; the trace on screen (if any) is unchanged.")
    st.text(str(exc))

if TRACE in st.session_state:
    trace, attn = st.session_state[TRACE]
    views.render_trace(trace, attn, "viewer", state_key=TRACE)

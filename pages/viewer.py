"""Trace viewer page: reload a saved trace (upload or example) and see every view of the Generate page."""

import logging

import streamlit as st

from explorer_core import tracefile
from explorer_core.trace import TraceError
from explorer_ui import frame, loading, resources, tempfiles, views
from explorer_ui.base import clip, escape_text

TRACE, SOURCE, KEPT = "viewer_trace", "viewer_source", "viewer_source_kept"

frame.page("Trace viewer", settings=False)  # the sidebar shows the loaded trace's settings, not Generate's
st.title("Trace viewer")
# local only: a public host never reads the paths its visitors type
SOURCES = ["Recent runs", "Examples", "Upload"] + ([] if resources.limits().hosted else ["Saved runs"])
# Streamlit forgets a widget's value once its page is left; a plain key keeps the choice, so coming
# back to an uploaded trace never swaps in an example. A reload starts from the URL's ?source=.
URL_NAMES = {"recent": "Recent runs", "examples": "Examples", "upload": "Upload", "saved": "Saved runs"}
st.session_state[SOURCE] = st.session_state.get(KEPT) or URL_NAMES.get(st.query_params.get("source", ""), "Examples")
if st.session_state[SOURCE] not in SOURCES:  # e.g. ?source=saved on a public host
    st.session_state[SOURCE] = "Examples"
src = st.radio(
    "Source",
    SOURCES,
    horizontal=True,
    key=SOURCE,
    on_change=lambda: st.session_state.update({KEPT: st.session_state[SOURCE]}),
)
if st.query_params.get("source") != (name := next(k for k, v in URL_NAMES.items() if v == src)):
    st.query_params["source"] = name


def keep(loaded) -> None:
    """Show a newly loaded trace; the temporary files of the one it replaces are removed."""
    old = st.session_state.get(TRACE)
    tempfiles.track(loaded[1])  # an upload's folder goes when this session does
    st.session_state[TRACE] = loaded
    if old is not None and old[1] is not loaded[1]:
        loading.forget(old[1])


def load_uploads() -> None:
    cap = loading.upload_cap_mb()
    # No `type=`: Streamlit would raise its own exception box for a wrong extension; the loader
    # checks names itself and says plainly what it accepts.
    files = st.file_uploader(
        "trace.json with its .attn.safetensors companion, or a trace.zip",
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
        # file names are the visitor's: escaped, as a warning is Markdown (images would load, links show)
        names = escape_text(", ".join(skipped))
        st.warning(f"Left out (not a trace.json, an .attn.safetensors companion or a .zip): {names}")
    sig = tuple((f.name, f.size, f.file_id) for f in files)
    if st.session_state.get("viewer_loaded") == sig:
        return
    refused = st.session_state.get("viewer_refused")
    if refused is not None and refused[0] == sig:  # the same files again: say why, do not read them again
        raise TraceError(refused[1])
    try:
        trace, attn = loading.from_uploads(files)
    except TraceError as exc:
        st.session_state["viewer_refused"] = (sig, str(exc))
        raise
    keep((trace, attn))
    st.session_state["viewer_loaded"] = sig
    if trace.attention is not None and attn is None:
        st.session_state["viewer_note"] = (
            f"No attention companion (.attn.safetensors) arrived with this trace. If you added one, it may be over "
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
        keep(tracefile.load(examples[name]))
        st.session_state["viewer_loaded"] = name
        st.session_state.pop("viewer_note", None)


def load_recent() -> None:
    """Runs this server's Generate page finished (or a reload cut short): a reload loses nothing."""
    runs = tempfiles.recent_runs(owner=tempfiles.owner() if resources.limits().hosted else None)
    if not runs:
        st.info(f"No runs yet: this server keeps the newest {tempfiles.recent_bounds()[0]} runs of its Generate page.")
        return
    labels = {}
    for path, meta in runs:  # two runs in one second with the same model and length: the folder tells them apart
        label = tempfiles.recent_label(path, meta)
        labels[label if label not in labels else f"{label} · {path.parent.name[-4:]}"] = path
    pick = st.selectbox("Run", list(labels), key="viewer_recent")
    if st.session_state.get("viewer_loaded") != str(labels[pick]):
        keep(loading.from_saved(labels[pick]))
        st.session_state["viewer_loaded"] = str(labels[pick])
        st.session_state.pop("viewer_note", None)


def load_saved() -> None:
    """Runs the command line saved (--out_dir): any size, mapped from disk instead of uploaded."""
    folder = st.text_input("Folder of saved runs", "runs", key="viewer_folder")
    found, note = loading.saved_traces(folder)  # regular files only: links and pipes are never listed
    if note:
        st.caption(note)
    if not found:
        st.info("No trace.json under that folder: the command line writes runs there with --out_dir.")
        return
    paths = {str(p): p for p in found}
    pick = st.selectbox("Run", list(paths), key="viewer_run")
    if st.session_state.get("viewer_loaded") != pick:
        keep(loading.from_saved(paths[pick]))
        st.session_state["viewer_loaded"] = pick
        st.session_state.pop("viewer_note", None)


try:
    if src == "Upload":
        load_uploads()
    elif src == "Saved runs":
        load_saved()
    elif src == "Recent runs":
        load_recent()
    else:
        load_example()
except TraceError as exc:
    st.error("This file cannot be shown; the trace on screen (if any) is unchanged.")
    st.text(clip(str(exc), 1000))
except Exception as exc:  # a reader's own bug: said here, the rest of the page (and the trace shown) stays
    logging.getLogger(__name__).exception("loading a trace failed")
    st.error("This file could not be read; the trace on screen (if any) is unchanged.")
    st.text(f"{type(exc).__name__}: {clip(str(exc))}")

if "viewer_note" in st.session_state:
    st.warning(st.session_state["viewer_note"])
if TRACE in st.session_state:
    views.render_trace_settings(st.session_state[TRACE][0])
    views.render_trace(TRACE, "viewer")

"""Live generation inside a Streamlit script: stream tokens, throttle redraws, survive Stop and reruns.

The Run object is put in session_state before the loop. Stop, or any widget change, interrupts the
script at its next Streamlit call; every step is already complete by then (see explorer_core.stepper),
so the next rerun turns the unfinished Run into a partial trace with stop reason "interrupted".
"""

from __future__ import annotations

import os
import shutil
import time

import streamlit as st

from explorer_core.config import GenerationConfig
from explorer_core.models import LoadedModel
from explorer_core.recorder import TEMP_PREFIX
from explorer_core.stepper import Run

from . import resources, tempfiles
from .base import stream_html

# The browser shares the CPU with the model (2 cores): redraws start at 4 a second, so a run feels
# live, and slow down to one every REDRAW_MAX_S as it goes on; only the newest tokens are redrawn while
# running (the whole stream appears when the run ends).
REDRAW_MAX_S = float(os.environ.get("EXPLORER_REDRAW_MAX_S", "2.0"))
LIVE_TOKENS = int(os.environ.get("EXPLORER_LIVE_TOKENS", "60"))


def redraw_interval(elapsed_s: float) -> float:
    return min(REDRAW_MAX_S, 0.25 + elapsed_s / 5)


def settle(run_key: str, trace_key: str, keep_live: bool = False) -> None:
    """Turn a Run left in session_state into a stored (trace, attention); unfinished means interrupted."""
    run: Run | None = st.session_state.get(run_key)
    if run is None:
        return
    store = run.attention()
    if run.recorder is not None:
        # a complete file (downloads copy it as is); nothing to keep when stopped before the prompt was read
        if store is not None:
            run.recorder.finish()
        else:
            run.recorder.discard()
    old = st.session_state.get(trace_key)
    st.session_state[trace_key] = (run.trace(), store)
    if old is not None and old[1] is not None and (store is None or old[1].path != store.path):
        from .loading import forget

        forget(old[1])  # the previous run's recording: one per session on the server's disk, not one per run
    if keep_live:
        st.session_state[trace_key + "_live"] = run  # its KV cache lets branches skip the prefix
    del st.session_state[run_key]


def generate_live(
    lm: LoadedModel, config: GenerationConfig, run_key: str, trace_key: str, keep_live: bool = False
) -> None:
    """Generate with a live stream; stores the result under trace_key."""
    notice = st.empty()
    lock = resources.acquire_generation_slot(notice)
    try:
        path = recording_path(config)
        try:
            run = Run(lm, config, resources.limits(), attention_path=path)
        except BaseException:
            if path is not None:
                shutil.rmtree(os.path.dirname(path), ignore_errors=True)  # refused before it recorded anything
            raise
        st.session_state[run_key] = run
        stream_run(run, config)
    finally:
        lock.release()  # no Streamlit calls here: this also runs when the script is interrupted
    st.session_state[trace_key + "_why"] = run.error  # why it stopped early (a full disk, the size cap)
    settle(run_key, trace_key, keep_live)


def recording_path(config: GenerationConfig) -> str | None:
    """Where a run records attention: a folder of this session's (named with the server's pid), so the
    session's end, the server's exit or the next start removes it (see tempfiles); None records nothing."""
    if not config.capture_attention:
        return None
    folder = tempfiles.new_folder(TEMP_PREFIX)
    tempfiles.track_folder(folder)  # tracked before the run starts: a session closed mid-run leaves nothing
    return str(folder / "attention.safetensors")


def stream_run(run: Run, config: GenerationConfig) -> None:
    """Iterate the run, redrawing progress, tokens/s and the newest tokens now and then."""
    rate, box = st.empty(), st.empty()
    progress = st.progress(0.0, text="prefill…")
    start = last = time.perf_counter()
    for step in run:
        now = time.perf_counter()
        if now - last >= redraw_interval(now - start) or run.stop_reason is not None:
            last = now
            done = step.step + 1
            progress.progress(min(done / config.max_new_tokens, 1.0), text=f"{done} / {config.max_new_tokens} tokens")
            rate.caption(f"{done / max(run_seconds(run), 1e-9):.1f} tokens/s")
            box.html(stream_html(run.steps[-LIVE_TOKENS:]))
    progress.empty()
    rate.empty()
    box.empty()


def run_seconds(run: Run) -> float:
    """Model time so far, as the trace's tokens/s counts it: prefill plus every step (display excluded)."""
    return run.prefill_s + sum(s.time_s for s in run.steps)

"""Live generation inside a Streamlit script: stream tokens, throttle redraws, survive Stop and reruns.

The Run object is put in session_state before the loop. Stop, or any widget change, interrupts the
script at its next Streamlit call; every step is already complete by then (see explorer_core.stepper),
so the next rerun turns the unfinished Run into a partial trace with stop reason "interrupted".
"""

from __future__ import annotations

import logging
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
    lm: LoadedModel,
    config: GenerationConfig,
    run_key: str,
    trace_key: str,
    keep_live: bool = False,
    load_s: float | None = None,
) -> None:
    """Generate with a live stream; stores the result under trace_key. `load_s`: this run's wait for the
    model (the trace's timing.load_s); by default the time the server's first load took."""
    guard = st.empty()
    guard.html(LEAVE_GUARD, unsafe_allow_javascript=True)  # the browser asks before a reload throws the run away
    owner = tempfiles.owner()  # read now: the finally below runs while a closing session is stopped
    notice = st.empty()
    lock = resources.acquire_generation_slot(notice)
    run = None
    try:
        path = recording_path(config)
        try:
            run = Run(lm, config, resources.limits(), attention_path=path)
        except BaseException:
            if path is not None:
                shutil.rmtree(os.path.dirname(path), ignore_errors=True)  # refused before it recorded anything
            raise
        if load_s is not None:
            run.load_s = load_s
        st.session_state[run_key] = run
        stream_run(run, config)
    finally:
        lock.release()  # no Streamlit calls here: this also runs when the script is interrupted
        if run is not None:
            keep_recent(run, owner)  # a reload mid-run ends this session: the partial run is kept too
    guard.empty()
    st.session_state[trace_key + "_why"] = run.error  # why it stopped early (a full disk, the size cap)
    settle(run_key, trace_key, keep_live)


# While a run goes, a hidden marker sits on the page; one handler (added once per browser tab) asks
# before leaving only while a marker is there, so a finished run's page reloads without a question.
LEAVE_GUARD = """<div class="explorer-running" style="display:none"></div>
<script>
if (!window.__explorerLeaveGuard) {
  window.__explorerLeaveGuard = function (event) {
    if (document.querySelector(".explorer-running")) { event.preventDefault(); event.returnValue = "A run is going"; return "A run is going"; }
  };
  window.addEventListener("beforeunload", window.__explorerLeaveGuard);
}
</script>"""


def keep_recent(run: Run, owner: str) -> None:
    """Put the run's trace pair in the server's recent runs (the Trace viewer lists them). No Streamlit calls.
    A failure here is logged, never raised: it would hide why the run ended (a Stop, a closed tab)."""
    try:
        store = run.attention()
        if store is not None:
            run.recorder.finish()  # the file is complete before it is linked; settle's finish is then a no-op
        tempfiles.save_recent(run.trace(), store, owner)
    except Exception:
        logging.getLogger(__name__).exception("keeping the run in recent runs failed")


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
    progress = st.progress(0.0, text=f"Reading the {run.prompt_len}-token prompt…")
    run.on_prefill = reading = PrefillProgress(progress, run.prompt_len)
    start = last = time.perf_counter()
    for step in run:
        if reading.pending is not None:
            raise reading.pending  # a Stop or rerun that came during the prefill, now that a step is complete
        now = time.perf_counter()
        if now - last >= redraw_interval(now - start) or run.stop_reason is not None:
            last = now
            done = step.step + 1
            progress.progress(min(done / config.max_new_tokens, 1.0), text=f"{done} / {config.max_new_tokens} tokens")
            rate.caption(f"{decode_rate(run):.1f} tokens/s (decoding; the prompt took {run.prefill_s:.1f} s)")
            box.html(stream_html(run.steps[-LIVE_TOKENS:]))
    progress.empty()
    rate.empty()
    box.empty()


class PrefillProgress:
    """The prefill's progress, layer by layer, with the time so far and an estimate of what is left.

    It is called from inside the model's forward: a Stop or rerun raised by the redraw is kept and raised
    again after the forward (stream_run), so the run is never cut inside a forward."""

    def __init__(self, progress, prompt_len: int) -> None:
        self.progress, self.prompt_len = progress, prompt_len
        self.pending: BaseException | None = None
        self.last = -1.0

    def text(self, done: int, layers: int, seconds: float) -> str:
        left = seconds * (layers - done) / max(done, 1)
        return (
            f"Reading the {self.prompt_len}-token prompt: layer {done} of {layers}, "
            f"{seconds:.1f} s so far, about {left:.0f} s left"
        )

    def __call__(self, done: int, layers: int, seconds: float) -> None:
        if self.pending is not None or (seconds - self.last < 0.5 and done < layers):
            return  # at most two redraws a second: a short prompt's prefill draws nothing but its end
        self.last = seconds
        try:
            self.progress.progress(done / layers, text=self.text(done, layers, seconds))
        except BaseException as exc:  # noqa: BLE001 - Stop and reruns, raised again after the forward
            self.pending = exc


def decode_rate(run: Run) -> float:
    """Tokens a second over the cached steps after the first (which comes with the prefill)."""
    seconds = sum(s.time_s for s in run.steps[1:])
    return (len(run.steps) - 1) / seconds if seconds > 0 else 0.0

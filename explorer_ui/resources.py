"""Process-wide resources: the cached read-only models and the one-generation-at-a-time lock."""

from __future__ import annotations

import contextlib
import threading
import time
import weakref

import streamlit as st

from explorer_core import export_html, models
from explorer_core.limits import Limits
from explorer_core.models import LoadedModel, ModelLoadError
from explorer_core.stepper import check_fidelity

from .base import clip

# what _load has returned, for size estimates; weak, so the cache's eviction really frees a model
LOADED: weakref.WeakValueDictionary[tuple[str, str, str], LoadedModel] = weakref.WeakValueDictionary()


def canonical(name: str, dtype: str, device: str, device_map: str = "none") -> tuple[str, str, str]:
    """One key per set of weights: the default's name and its hub id, or "auto" and the dtype it picks,
    name the same copy (two keys for one model once doubled the memory of a hosted box)."""
    source = models.resolve(name.strip())
    dev = models.pick_device(device)
    kind = str(models.pick_dtype(dtype, dev)).removeprefix("torch.")
    where = source.location + (f"#{source.gguf_file}" if source.gguf_file else "")
    return where, kind, dev + ("" if device_map == "none" else f"+{device_map}")


@st.cache_resource(show_spinner=False, max_entries=3)
def _load(key: tuple[str, str, str], name: str, dtype: str, device: str, device_map: str = "none") -> LoadedModel:
    lm = models.load(name, dtype=dtype, device=device, limits=limits(), device_map=device_map)
    check_fidelity(lm)  # before the model is shared: the check switches implementations for its references
    LOADED[key] = lm
    return lm


def _load_once(key, name, dtype, device, device_map) -> LoadedModel:
    hit = LOADED.get(key)
    return hit if hit is not None else _load(key, name, dtype, device, device_map)


def limits() -> Limits:
    return Limits.from_env()


def loaded_already(name: str, dtype: str, device: str, device_map: str = "none") -> LoadedModel | None:
    """The model if this process has loaded it, without loading it."""
    try:
        return LOADED.get(canonical(name, dtype, device, device_map))
    except (ModelLoadError, ValueError, TypeError, AttributeError, OSError, RuntimeError):
        return None  # a name no path can hold ("~nosuchuser/x", 300 characters): not loaded, and never will be


# One per process, shared by every session: 2 CPU cores run one generation well, not two.
GENERATION_LOCK = threading.Lock()


def generation_lock() -> threading.Lock:
    return GENERATION_LOCK


# What a model name can raise before any model code runs: "~nosuchuser/x" makes Path.expanduser raise
# RuntimeError, a 300-character name OSError (File name too long); models.load wraps only its own failures.
LOAD_FAILURES = (ModelLoadError, OSError, RuntimeError, ValueError)
SIDEBAR_FIX = "type a hub id (owner/name) or an existing local folder in the sidebar"
TRACE_FIX = 'set the trace\'s config "model" to a hub id (owner/name) or an existing local folder and load it again'


def load_problem(name: str, exc: BaseException, fix: str = SIDEBAR_FIX) -> str:
    """One sentence: which model, why it cannot be loaded, and what to do."""
    if isinstance(exc, ModelLoadError):
        return str(exc)  # models.load's own messages already name the model and the fix
    reason = (str(exc).splitlines() or [""])[0]
    return f"Model {clip(name, 80)!r} cannot be loaded ({type(exc).__name__}: {clip(reason, 160)}): {fix}."


def get_model(
    name: str, dtype: str = "auto", device: str = "auto", device_map: str = "none", fix: str = SIDEBAR_FIX
) -> LoadedModel | None:
    """Load (once per process) with a status box; None, with a clear message shown, when it fails."""
    try:
        hit = LOADED.get(canonical(name, dtype, device, device_map))
    except LOAD_FAILURES:
        hit = None
    if hit is not None:
        return hit  # loaded already: no status box (every run drew another "Model ready")
    first = models.is_default(name) and not (models.converted_dir() / "model.safetensors").is_file()
    note = " (first use: converting the embedded model, about 25 s)" if first and models.embedded_gguf() else ""
    start = time.perf_counter()
    problem = None
    with st.status(f"Loading model{note}…", expanded=False) as status:
        try:
            # hashed by the canonical key only: the other arguments are the first spelling that loaded it
            lm = _load_once(canonical(name, dtype, device, device_map), name.strip(), dtype, device, device_map)
        except LOAD_FAILURES as exc:
            status.update(label="Model could not be loaded", state="error")
            problem = load_problem(name, exc, fix)
        else:
            status.update(label=f"Model ready ({time.perf_counter() - start:.1f} s)", state="complete")
    if problem is not None:
        st.text(problem)  # plain text, outside the folded status box: the message quotes the name from the file
        return None
    return lm


def acquire_generation_slot(placeholder) -> threading.Lock:
    """Take the lock; while another session holds it, say so and wait (Stop still interrupts)."""
    lock = generation_lock()
    if lock.acquire(blocking=False):
        return lock
    placeholder.info("Another session is generating right now; yours starts as soon as it finishes…")
    while not lock.acquire(timeout=0.5):
        placeholder.info("Another session is generating right now; yours starts as soon as it finishes…")
    placeholder.empty()
    return lock


@st.cache_resource(show_spinner=False)
def warm_export() -> threading.Thread:
    """Once per process, in the background: the Vega bundle the HTML export inlines (seconds to build)."""
    thread = threading.Thread(target=export_html.warm, name="vega-bundle", daemon=True)
    thread.start()
    return thread


def model_for_trace(trace, what: str) -> LoadedModel | None:
    """The model that made `trace`, for re-running it (replay, explain): its settings and the host's caps
    are checked before anything loads; None, with the reason shown, when it cannot be used."""
    from explorer_core.config import GenerationConfig

    try:
        config = GenerationConfig.from_dict(trace.config)
        limits().check_replay(trace)  # re-running a trace costs what generating it did: the same caps
    except ValueError as exc:
        st.text(f"Cannot {what} here: {clip(str(exc))}")
        return None
    return get_model(config.model, config.dtype, config.device, config.device_map, fix=TRACE_FIX)


@contextlib.contextmanager
def model_job():
    """One model job at a time per process, as generation: wait for the slot (saying so), then hold it."""
    lock = acquire_generation_slot(st.empty())
    try:
        yield
    finally:
        lock.release()

"""The shared sidebar: one widget per GenerationConfig field, ranges taken from the config itself."""

from __future__ import annotations

import dataclasses

import streamlit as st

from explorer_core.config import DEFAULT_MODEL, GenerationConfig, field_specs
from explorer_core.limits import Limits

P = "sidebar_"
PRESETS = [DEFAULT_MODEL, "gpt2", "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "Other (type a hub id or folder)"]
OTHER = PRESETS[-1]


def presets() -> list[str]:
    """The model choices this host allows: on a host with an allowlist, only its models (no free text)."""
    from .resources import limits

    allowed = limits().allowed_models
    if not allowed:
        return PRESETS
    return [m for m in PRESETS if m in allowed] + [m for m in allowed if m not in PRESETS]


# Layout groups; fields not listed here are rendered by hand (model, prompt) or kept at their default.
SAMPLING = ["temperature", "top_p", "top_k", "repetition_penalty", "no_repeat_ngram_size"]
LENGTH = ["max_new_tokens", "min_new_tokens", "block_eos_steps", "block_ws_steps", "stop_on", "clean_stop", "seed"]
RECORD = [
    "chat",
    "top_n",
    "capture_attention",
    "attention_precision",
    "attn_every",
    "logit_lens",
    "dtype",
    "device",
    "device_map",
]
STEPS = {"temperature": 0.05, "top_p": 0.01, "repetition_penalty": 0.05}


HOST_CAPS: dict[str, int] = {}


def _host_caps() -> None:
    """A public host's limits shrink the ranges the sidebar accepts."""
    lim = Limits.from_env()
    HOST_CAPS.update(max_new_tokens=lim.max_new_tokens, min_new_tokens=lim.max_new_tokens, top_n=lim.max_top_n)


def _init_state() -> None:
    """Defaults go into session_state once and widgets read them from there (no `value=`).

    Each page gives its widgets their own ids, and a widget first drawn on a page starts from its
    default unless its key was set in code: so every value is set again here, before the widgets,
    which keeps what the user chose across pages.
    """
    defaults = {P + "model_choice": PRESETS[0], P + "model_custom": ""} | {P + f.name: f.default for f in field_specs()}
    for key, default in defaults.items():
        st.session_state[key] = st.session_state.get(key, default)


def render() -> GenerationConfig | None:
    """Draw the sidebar and return the config it describes, or None (with the reason shown)."""
    _init_state()
    _host_caps()
    specs = {f.name: f for f in field_specs()}
    values = {}
    with st.sidebar:
        st.header("Generation")
        choice = st.selectbox("Model", presets(), key=P + "model_choice", help="The embedded default works offline.")
        if choice == OTHER:
            values["model"] = st.text_input("Hub id or local folder", key=P + "model_custom")
        else:
            values["model"] = choice
        values["prompt"] = st.text_area("Prompt", key=P + "prompt", height=100)
        with st.expander("Sampling", expanded=True):
            for name in SAMPLING:
                values[name] = _widget(specs[name])
        with st.expander("Length and stopping", expanded=False):
            for name in LENGTH:
                values[name] = _widget(specs[name])
        with st.expander("Recording and model", expanded=False):
            for name in RECORD:
                values[name] = _widget(specs[name])
    if not values["model"].strip():
        st.sidebar.warning("Type a hub id or a local folder for the model.")
        return None
    try:
        config = GenerationConfig(**values)
        _check_host_caps(values)
        return config
    except ValueError as exc:
        st.sidebar.error("Settings are not valid")
        st.sidebar.text(str(exc))  # plain text: the message may quote what was typed
        return None


def _check_host_caps(values: dict) -> None:
    for name, cap in HOST_CAPS.items():
        if isinstance(values.get(name), int) and values[name] > cap:
            raise ValueError(f"{name}={values[name]} is over this host's limit of {cap}: use a value up to {cap}")


def _widget(f: dataclasses.Field):
    meta, key, label = f.metadata, P + f.name, f.name.replace("_", " ")
    help_text = meta["help"]
    if f.type == "bool":
        return st.toggle(label, key=key, help=help_text)
    if f.type == "str":
        if meta.get("choices"):
            return st.selectbox(label, meta["choices"], key=key, help=help_text)
        return st.text_input(label, key=key, help=help_text)
    lo, hi = meta["min"], meta["max"]
    hi = min(hi, HOST_CAPS.get(f.name, hi))
    if f.type == "float":
        return st.slider(label, float(lo), float(hi), step=STEPS.get(f.name, 0.01), key=key, help=help_text)
    # No min/max on the box: the browser would keep an out-of-range entry to itself (a red box, the
    # old value still used). The value comes through and the config's check refuses it in words.
    return st.number_input(label, step=1, key=key, help=f"{help_text} ({lo} to {hi})")

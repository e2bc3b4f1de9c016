"""The shared sidebar: one widget per GenerationConfig field, ranges taken from the config itself."""

from __future__ import annotations

import dataclasses

import streamlit as st

from explorer_core.config import DEFAULT_MODEL, GenerationConfig, check_field, field_specs
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
# A link holds the prompt only up to this length: browsers and proxies cut URLs of a few tens of kB.
URL_PROMPT_MAX = 2000
URL_READ, URL_NOTE = P + "url_read", P + "url_note"


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
    if not st.session_state.get(URL_READ):  # once per session: a reload or a shared link starts from the URL
        st.session_state[URL_READ] = True
        read_url()
    defaults = {P + "model_choice": PRESETS[0], P + "model_custom": ""} | {P + f.name: f.default for f in field_specs()}
    for key, default in defaults.items():
        st.session_state[key] = st.session_state.get(key, default)


def keep_state() -> None:
    """For a page that draws no sidebar: keep every sidebar value (Streamlit drops a widget's value on a
    run that does not draw it), so coming back to Generate finds what the user chose; they stay in the
    URL too, so a reload of this page and a later visit to Generate still have them."""
    _init_state()
    choice = st.session_state[P + "model_choice"]
    model = st.session_state[P + "model_custom"] if choice == OTHER else choice
    write_url({"model": model} | {f.name: st.session_state[P + f.name] for f in field_specs() if f.name != "model"})


def _parse(f: dataclasses.Field, text: str):
    """A URL value as the field's type; ValueError (naming the field) when it is not one."""
    if f.type == "bool":
        low = text.strip().lower()
        if low not in ("true", "false", "1", "0"):
            raise ValueError(f"{f.name}={text[:40]!r} is not true or false")
        return low in ("true", "1")
    try:
        value = {"int": int, "float": float}.get(f.type, str)(text)
    except ValueError:
        kind = "a whole number" if f.type == "int" else "a number"
        raise ValueError(f"{f.name}={text[:40]!r} is not {kind}") from None
    check_field(f, value)
    cap = HOST_CAPS.get(f.name)
    if cap is not None and value > cap:
        raise ValueError(f"{f.name}={value} is over this host's limit of {cap}")
    return value


def read_url() -> None:
    """Set the sidebar from the page's query parameters (named as the config's fields); a value that is
    not valid is ignored, and the sidebar says which and why."""
    _host_caps()
    specs = {f.name: f for f in field_specs()}
    notes = []
    for name, text in st.query_params.to_dict().items():
        if name == "model":
            note = _read_model(text)
        elif name in specs:
            try:
                st.session_state[P + name] = _parse(specs[name], text)
                note = None
            except ValueError as exc:
                note = str(exc)
        else:
            continue  # other parameters (the viewer's, a run owner) are not the sidebar's
        if note:
            notes.append(note)
    if notes:
        st.session_state[URL_NOTE] = notes


def _read_model(text: str) -> str | None:
    name = text.strip()[:500]
    choices = presets()
    if name in choices:
        st.session_state[P + "model_choice"] = name
    elif OTHER in choices and name:
        st.session_state[P + "model_choice"] = OTHER
        st.session_state[P + "model_custom"] = name
    else:
        return f"model={name[:80]!r} is not one of this host's models ({', '.join(choices)})"
    return None


def write_url(values: dict) -> None:
    """Put every setting that differs from its default into the URL (only when it changed, as each write
    is a message to the browser): a reload starts from it, and the link reproduces the run's settings."""
    defaults = {f.name: f.default for f in field_specs()}
    want = {}
    for name, value in values.items():
        if value == defaults.get(name) or (name == "prompt" and len(value) > URL_PROMPT_MAX):
            continue
        want[name] = (
            str(value).lower()
            if isinstance(value, bool)
            else repr(round(value, 6))
            if isinstance(value, float)
            else str(value)
        )
    have = {k: v for k, v in st.query_params.to_dict().items() if k in defaults}
    if have == want:
        return
    for name in set(have) - set(want):
        del st.query_params[name]
    st.query_params.update({k: v for k, v in want.items() if have.get(k) != v})


def render() -> GenerationConfig | None:
    """Draw the sidebar and return the config it describes, or None (with the reason shown)."""
    _init_state()
    _host_caps()
    specs = {f.name: f for f in field_specs()}
    values = {}
    with st.sidebar:
        st.header("Generation")
        if st.session_state.get(URL_NOTE):
            st.caption("Ignored from the link (the defaults are used instead):")
            st.text("\n".join(st.session_state[URL_NOTE]))  # plain text: it quotes what the URL said
        choice = st.selectbox("Model", presets(), key=P + "model_choice", help="The embedded default works offline.")
        if choice == OTHER:
            values["model"] = st.text_input("Hub id or local folder", key=P + "model_custom")
        else:
            values["model"] = choice
        values["prompt"] = st.text_area("Prompt", key=P + "prompt", height=100)
        if len(values["prompt"]) > URL_PROMPT_MAX:
            st.caption(
                f"Over {URL_PROMPT_MAX:,} characters, this prompt stays out of the page's link: a reload keeps the other settings."
            )
        values["chat"] = _widget(specs["chat"])  # with the prompt: it changes what the model reads
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
        write_url(values)
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
    """One field's widget, with its own problem (if any) shown right under it in its label's words."""
    value = _draw(f)
    problem = field_problem(f, value)
    if problem:
        st.error(problem)  # numbers and lengths only, never the typed text: st.error renders Markdown
    if f.name == "repetition_penalty":
        # a 0.1-10 slider is too fine to land on 1.00 by hand; 1.00 turns the penalty off
        st.button("Penalty off (1.00)", key=P + "repetition_penalty_off", on_click=_penalty_off, disabled=value == 1.0)
    return value


def _penalty_off() -> None:
    st.session_state[P + "repetition_penalty"] = 1.0


def field_problem(f: dataclasses.Field, value) -> str | None:
    """What is wrong with one field's value, in the words of its label; None when it is fine."""
    label, lo, hi = f.name.replace("_", " ").capitalize(), f.metadata.get("min"), f.metadata.get("max")
    if f.type == "str":
        most = f.metadata.get("max_chars")
        if most is not None and isinstance(value, str) and len(value) > most:
            return f"{label} is {len(value):,} characters long; shorten it to {most:,} or fewer."
        return None
    if f.type not in ("int", "float") or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    hi = min(hi, HOST_CAPS.get(f.name, hi)) if hi is not None else hi
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        return f"{label} must be from {lo} to {hi}; {value} is out of range."
    if f.name == "min_new_tokens":
        most = st.session_state.get(P + "max_new_tokens")
        if isinstance(most, int) and value > most:
            return f"{label} ({value}) is more than max new tokens ({most}): lower it, or raise max new tokens."
    return None


def _draw(f: dataclasses.Field):
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

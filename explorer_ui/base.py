"""Basic renderers for every view and the live stream: escaping, the shaded token stream, guarded views.

Imports nothing else of the UI, so any module can use it without an import circle. Token text is
untrusted (it comes from models and uploaded files): it reaches HTML only through `escape_text`, and
Markdown (captions, warnings, radio and pill labels) only through `escape_text` too.
"""

from __future__ import annotations

import logging

import streamlit as st

from explorer_core.markup import escape_text, stream_html
from explorer_core.trace import StepRecord

__all__ = ["clip", "escape_text", "guarded", "render_stream", "render_stream_picker", "schema_limit", "stream_html"]

_LOG = logging.getLogger(__name__)


# Clicking a token of a drawn trace inspects its step, as in the one-file export. The HTML it receives is
# `stream_html`'s: every token text escaped by `escape_text`, so no file or model text can become a tag.
_PICK_JS = """
export default function(component) {
  const { data, setTriggerValue, parentElement } = component;
  let box = parentElement.querySelector("div.explorer-stream");
  if (!box) {
    box = document.createElement("div");
    box.className = "explorer-stream";
    parentElement.appendChild(box);
  }
  box.innerHTML = data;
  box.querySelectorAll(".tok[data-step]").forEach((tok) => {
    tok.style.cursor = "pointer";
    tok.onclick = () => setTriggerValue("picked", Number(tok.dataset.step));
  });
}
"""
_PICK_CSS = ".explorer-stream { color: var(--st-text-color); } .tok:hover { outline: 1px solid #1f77b4; }"
_stream_picker = st.components.v2.component("explorer_stream_pick", js=_PICK_JS, css=_PICK_CSS)


def render_stream(steps: list[StepRecord], container=None) -> None:
    target = container if container is not None else st
    target.html(stream_html(steps) if steps else "<div><i>no tokens yet</i></div>")


def render_stream_picker(steps: list[StepRecord], key: str) -> int | None:
    """The shaded stream of a drawn trace; returns the step of a token clicked since the last rerun."""
    if not steps:
        st.html("<div><i>no tokens yet</i></div>")
        return None
    result = _stream_picker(data=stream_html(steps), key=key, on_picked_change=lambda: None)
    picked = getattr(result, "picked", None)
    return int(picked) if isinstance(picked, int | float) and not isinstance(picked, bool) else None


def clip(text: str, limit: int = 300) -> str:
    """At most `limit` characters of `text`, saying how much was cut: an echo never grows with the input."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text) - limit:,} more characters)"


def guarded(what: str, draw, *args, default=None, **kwargs):
    """Draw one view; an unexpected error shows in that view's place only, so one failing view never takes
    the rest of the page. `what` names the view (code text, never file text). Stop and reruns are
    BaseExceptions and pass through; the traceback goes to the server log, not to the visitor."""
    try:
        return draw(*args, **kwargs)
    except Exception as exc:
        _LOG.exception("view %r failed", what)
        st.error(f"{what}: this view could not be drawn; the rest of the page is unaffected.")
        st.text(f"{type(exc).__name__}: {clip(str(exc))}")  # plain text: the message may quote the file
        return default


def schema_limit(model, field: str, bound: str = "max_length") -> int:
    """A bound the trace schema puts on `field` (max_length, le): the UI refuses before the schema would."""
    for meta in model.model_fields[field].metadata:
        value = getattr(meta, bound, None)
        if value is not None:
            return int(value)
    raise LookupError(f"{model.__name__}.{field} declares no {bound}")

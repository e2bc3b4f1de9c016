"""Basic renderers for every view and the live stream: escaping and the shaded token stream.

Imports nothing else of the UI, so any module can use it without an import circle. Token text is
untrusted (it comes from models and uploaded files): it reaches HTML only through `escape_text`.
"""

from __future__ import annotations

import streamlit as st

from explorer_core.markup import escape_text, stream_html
from explorer_core.trace import StepRecord

__all__ = ["escape_text", "render_stream", "stream_html"]


def render_stream(steps: list[StepRecord], container=None) -> None:
    target = container if container is not None else st
    target.html(stream_html(steps) if steps else "<div><i>no tokens yet</i></div>")

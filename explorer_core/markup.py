"""HTML for token text, shared by the app's stream and the single-file export: one escaper, one shading rule."""

from __future__ import annotations

from .frames import is_torn, shade
from .trace import StepRecord

_MARKUP = set("*_$[]()`~#|:\\{}!<>&\"'=")
TOKEN_STYLE = "border-radius: 3px; padding: 1px 2px; margin: 1px; display: inline-block; font-family: monospace;"


def escape_text(text: str) -> str:
    """Escape every HTML and Markdown/LaTeX character in one pass (as numeric entities), so text shows
    verbatim in st.html or a page and nothing in it can start a tag, an attribute or a formatting run."""
    return "".join(f"&#{ord(ch)};" if ch in _MARKUP else ch for ch in text)


def token_span(s: StepRecord, path: int = 0) -> str:
    """One token as a shaded span: the less likely under the raw model, the stronger the shade."""
    torn = is_torn(s)  # the model was torn here: a dotted underline, and said in the tooltip
    note = "  · torn (high entropy, close top two)" if torn else ""
    tip = escape_text(f"step {s.step}: {s.label}  p_raw={s.p_raw:.3f}  p_proc={s.p_proc:.3f}  rank {s.rank_raw}{note}")
    mark = " border-bottom: 2px dotted #1f77b4;" if torn else ""
    return (
        f'<span class="tok" data-path="{path}" data-step="{s.step}" title="{tip}" '
        f'style="background: rgba(214,39,40,{shade(s.p_raw):.2f}); {TOKEN_STYLE}{mark}">{escape_text(s.label)}</span>'
    )


def stream_html(steps: list[StepRecord], path: int = 0) -> str:
    return '<div style="line-height: 1.9;">' + "".join(token_span(s, path) for s in steps) + "</div>"

"""Reading traces that users hand to the app: uploads (json + companion, or one zip) and example folders."""

from __future__ import annotations

import io
import zipfile
import zlib
from pathlib import Path

import streamlit as st

from explorer_core import trace as trace_io
from explorer_core.trace import AttentionData, Trace, TraceError

MAX_TRACE_BYTES = trace_io.MAX_TRACE_BYTES  # trace.json; a 512-step run is about 1 MB
KINDS = ("zip", "json", "npz")


def upload_cap_mb() -> int:
    """The one upload cap: Streamlit's `server.maxUploadSize` (MB), which the server enforces. Set it in
    .streamlit/config.toml or with STREAMLIT_SERVER_MAX_UPLOAD_SIZE; the uploader shows the same value."""
    return int(st.get_option("server.maxUploadSize"))


def upload_cap() -> int:
    return upload_cap_mb() * 1024 * 1024


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _check_size(name: str, size: int, cap: int) -> None:
    if size > cap:
        raise TraceError(f"{name} is {size / 1e6:.1f} MB, over the {cap / 1e6:.0f} MB limit for uploads")


def unusable(files: list) -> list[str]:
    """Names of uploaded files the viewer cannot use (they are left out, and the page says so)."""
    return [f.name for f in files if Path(f.name).suffix.lower().lstrip(".") not in KINDS]


def from_uploads(files: list) -> tuple[Trace, AttentionData | None]:
    """Uploaded files: a trace.zip, or a trace.json with an optional .npz companion; other files are skipped."""
    by_kind = {kind: [] for kind in KINDS}
    for f in files:
        kind = Path(f.name).suffix.lower().lstrip(".")
        if kind in by_kind:
            by_kind[kind].append(f)
    if not any(by_kind.values()):
        raise TraceError(
            f"{', '.join(unusable(files)) or 'no file'}: expected trace.json, its .attn.npz companion, or a .zip archive"
        )
    if by_kind["zip"]:
        z = by_kind["zip"][0]
        _check_size(z.name, z.size, upload_cap())
        return from_zip(z.getvalue())
    if not by_kind["json"]:
        raise TraceError("no trace.json among the uploaded files")
    js = by_kind["json"][0]
    _check_size(js.name, js.size, min(MAX_TRACE_BYTES, upload_cap()))
    trace = trace_io.parse(js.getvalue())
    if not by_kind["npz"] or trace.attention is None:
        return trace, None
    comp = by_kind["npz"][0]
    _check_size(comp.name, comp.size, upload_cap())
    return trace, trace_io.parse_attention(comp.getvalue(), trace)


def from_zip(data: bytes) -> tuple[Trace, AttentionData | None]:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            names = {i.filename: i for i in zf.infolist()}
            if "trace.json" not in names:
                raise TraceError("the archive holds no trace.json")
            for info in names.values():
                _check_size(info.filename, info.file_size, upload_cap())  # sizes before inflating
            trace = trace_io.parse(zf.read("trace.json"))
            comp = "trace.attn.npz"
            attn = trace_io.parse_attention(zf.read(comp), trace) if comp in names and trace.attention else None
    except (zipfile.BadZipFile, OSError, zlib.error, NotImplementedError, RuntimeError) as exc:
        raise TraceError(f"not a readable zip archive: {exc}") from None
    return trace, attn


def example_traces() -> dict[str, Path]:
    if not EXAMPLES.is_dir():
        return {}
    return {p.parent.name: p for p in sorted(EXAMPLES.glob("*/trace.json"))}

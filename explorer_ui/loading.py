"""Reading traces that users hand to the app: uploads (json + companion, or one zip) and example folders.

Every byte read from an upload is counted against a cap before it is kept: a zip member is inflated
in pieces and refused once it passes the cap, whatever its header claims. Companions are spooled to
a temporary folder and mapped from there, so a view reads only what it shows.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import zipfile
import zlib
from pathlib import Path

import streamlit as st

from explorer_core import admission, tracefile
from explorer_core import trace as trace_io
from explorer_core.attnstore import AttentionStore
from explorer_core.trace import Trace, TraceError

from . import tempfiles

MAX_TRACE_BYTES = trace_io.MAX_TRACE_BYTES  # trace.json; a 512-step run is about 1 MB
COMPANION_SUFFIXES = (".attn.safetensors", ".safetensors", ".attn.npz", ".npz")
PIECE = 1024 * 1024


def upload_cap_mb() -> int:
    """The one upload cap: Streamlit's `server.maxUploadSize` (MB), which the server enforces. Set it in
    .streamlit/config.toml or with STREAMLIT_SERVER_MAX_UPLOAD_SIZE; the uploader shows the same value."""
    return int(st.get_option("server.maxUploadSize"))


def upload_cap() -> int:
    return upload_cap_mb() * 2**20


# a clone keeps examples/ beside the packages; an installed package ships them inside explorer_app
EXAMPLES = next(
    (
        p
        for p in (
            Path(__file__).resolve().parents[1] / "examples",
            Path(__file__).resolve().parents[1] / "explorer_app" / "examples",
        )
        if p.is_dir()
    ),
    Path(__file__).resolve().parents[1] / "examples",
)


def _check_size(name: str, size: int, cap: int) -> None:
    if size > cap:
        raise TraceError(f"{name} is {size / 2**20:.1f} MiB, over the {cap / 2**20:.0f} MiB limit for uploads")


def _kind(name: str) -> str | None:
    low = name.lower()
    if low.endswith(".zip"):
        return "zip"
    if low.endswith(".json"):
        return "json"
    if low.endswith(COMPANION_SUFFIXES):
        return "companion"
    return None


def work_dir() -> Path:
    """A fresh temporary folder for one loaded trace's companion (the caller removes it with `forget`; its
    session's end, or the server's, removes it otherwise: see tempfiles). Refused past EXPLORER_TEMP_MB."""
    try:
        return tempfiles.new_folder(tempfiles.UPLOAD_PREFIX)
    except ValueError as exc:
        raise TraceError(f"the attention companion cannot be kept: {exc}") from None


def forget(store: AttentionStore | None) -> None:
    """Remove the temporary folder behind an uploaded companion or an app run's recording; a companion
    anywhere else (an example, a saved run) is never touched."""
    if store is not None and store.path.parent.name.startswith(tempfiles.PREFIXES):
        store.close()
        shutil.rmtree(store.path.parent, ignore_errors=True)


def unusable(files: list) -> list[str]:
    """Names of uploaded files the viewer cannot use (they are left out, and the page says so)."""
    return [f.name for f in files if _kind(f.name) is None]


def newest_upload(files: list) -> list:
    """The files of the newest trace in the uploader's list (which keeps every file in the order it
    arrived): from the last trace.json or zip on, plus what came between it and the trace before (its
    companion may come first). A new trace.json then replaces the one on screen, not an error."""
    traces = [i for i, f in enumerate(files) if _kind(f.name) in ("json", "zip")]
    if len(traces) < 2:
        return files
    return files[traces[-2] + 1 :]


def from_uploads(files: list) -> tuple[Trace, AttentionStore | None]:
    """Uploaded files: a trace.zip, or a trace.json with an optional companion; other files are skipped.
    With more than one trace in the list, the newest is read (see newest_upload)."""
    by_kind: dict[str, list] = {"zip": [], "json": [], "companion": []}
    for f in newest_upload(files):
        kind = _kind(f.name)
        if kind is not None:
            by_kind[kind].append(f)
    if not any(by_kind.values()):
        raise TraceError(
            f"{', '.join(unusable(files)) or 'no file'}: expected trace.json, its .attn.safetensors companion, "
            "or a .zip archive"
        )
    if by_kind["zip"]:
        z = by_kind["zip"][0]
        _check_size(z.name, z.size, upload_cap())
        return from_zip(z.getvalue())
    if len(by_kind["json"]) != 1 or len(by_kind["companion"]) > 1:
        raise TraceError("upload one trace.json, optionally with its one attention companion")
    js = by_kind["json"][0]
    _check_size(js.name, js.size, min(MAX_TRACE_BYTES, upload_cap()))
    trace = admission.admit_trace(js.getvalue())
    if not by_kind["companion"] or trace.attention is None:
        return trace, None
    comp = by_kind["companion"][0]
    _check_size(comp.name, comp.size, upload_cap())
    return _open(trace, comp.name, lambda fh: fh.write(comp.getvalue()))


def _open(trace: Trace, name: str, write) -> tuple[Trace, AttentionStore]:
    """Spool a companion into a fresh folder with `write(file)`, then open and check it."""
    folder = work_dir()
    suffix = ".attn.npz" if name.lower().endswith(".npz") else tracefile.SUFFIX
    path = folder / ("upload" + suffix)
    try:
        with open(path, "wb") as fh:
            write(fh)
        return admission.admit_companion(path, trace, folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, cap: int, out) -> int:
    """Inflate one member into `out` in pieces, refusing it once more than `cap` bytes come out."""
    total = 0
    with zf.open(info) as fh:
        while piece := fh.read(PIECE):
            total += len(piece)
            if total > cap:
                raise TraceError(
                    f"{info.filename} inflates past {cap / 2**20:.0f} MiB: refused (the archive's sizes are wrong)"
                )
            out.write(piece)
    return total


def from_zip(data: bytes) -> tuple[Trace, AttentionStore | None]:
    cap = upload_cap()
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
            names = [i.filename for i in infos]
            if len(names) != len(set(names)):
                raise TraceError("the archive holds two members with the same name: refused")
            if "trace.json" not in names:
                raise TraceError("the archive holds no trace.json")
            for info in infos:
                _check_size(info.filename, info.file_size, cap)  # what the directory claims, before inflating
            buf = io.BytesIO()
            read_member(zf, zf.getinfo("trace.json"), min(cap, MAX_TRACE_BYTES), buf)
            trace = admission.admit_trace(buf.getvalue())
            comps = [i for i in infos if _kind(i.filename) == "companion"]
            if len(comps) > 1:
                raise TraceError("the archive holds more than one attention companion")
            if not comps or trace.attention is None:
                return trace, None
            return _open(trace, comps[0].filename, lambda fh: read_member(zf, comps[0], cap, fh))
    except (zipfile.BadZipFile, OSError, zlib.error, NotImplementedError, RuntimeError, EOFError) as exc:
        raise TraceError(f"not a readable zip archive: {exc}") from None


def example_traces() -> dict[str, Path]:
    if not EXAMPLES.is_dir():
        return {}
    return {p.parent.name: p for p in sorted(EXAMPLES.glob("*/trace.json"))}


# Saved runs: the folder a visitor types is walked without following links, and only regular files named
# trace.json are listed: a link to /dev/zero or a FIFO named trace.json is never opened (the read itself
# goes through admission, which checks again and caps the bytes).
SAVED_MAX_FOUND = 200
SAVED_MAX_ENTRIES = 20_000  # directory entries looked at: a typed "/" lists what it finds so far, then stops


def saved_traces(folder: str) -> tuple[list[Path], str | None]:
    """Regular trace.json files under `folder` (links never followed), and a note when the walk was cut."""
    try:
        root = Path(folder).expanduser()
    except RuntimeError as exc:  # "~nosuchuser": no home directory to expand
        raise TraceError(f"cannot read the folder {folder[:200]!r}: {exc}") from None
    found: list[Path] = []
    pending, seen = [root], 0
    while pending and len(found) < SAVED_MAX_FOUND:
        try:
            with os.scandir(pending.pop()) as it:
                for entry in it:  # d_type from the directory itself: no stat, and no link is followed
                    seen += 1
                    if seen > SAVED_MAX_ENTRIES:
                        return sorted(found), f"Stopped after {SAVED_MAX_ENTRIES:,} entries: type a narrower folder."
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(Path(entry.path))
                    elif entry.name == "trace.json" and entry.is_file(follow_symlinks=False):
                        found.append(Path(entry.path))
        except OSError:
            continue  # unreadable, or not a folder
    return sorted(found)[:SAVED_MAX_FOUND], None


def from_saved(path: Path) -> tuple[Trace, AttentionStore | None]:
    """A listed trace.json and its companion, re-checked now: a regular file, not a link (it may have changed)."""
    try:
        regular = stat.S_ISREG(os.lstat(path).st_mode)
    except OSError as exc:
        raise TraceError(f"cannot read {path.name}: {exc.strerror}") from None
    if not regular:
        raise TraceError(f"{path} is not a regular file (a link, a pipe or a device): refused")
    return tracefile.load(path)

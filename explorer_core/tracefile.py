"""Saving and loading a trace with its attention companion, committed as a pair.

`save` writes the companion under a fresh name (`trace.<id>.attn.safetensors`), then trace.json
naming it, each by an atomic rename: a kill at any moment leaves either the old pair or the new one,
never a trace.json whose companion was replaced. Leftovers of earlier pairs and of killed saves are
removed once the new trace.json is in place. `load` and `open_companion` check the companion
against the trace before any view reads it; schema-1 `.attn.npz` companions are converted.
"""

from __future__ import annotations

import os
import secrets
import tempfile
import time
from pathlib import Path

from . import legacy
from .attnstore import AttentionFileError, AttentionStore, open_store
from .trace import MAX_TRACE_BYTES, Trace, TraceError, dumps, parse

SUFFIX = ".attn.safetensors"
STALE_S = 600  # a temporary file older than this belongs to a save that was killed


def companion_name(json_path: Path, token: str | None = None) -> str:
    return f"{json_path.name.removesuffix('.json')}.{token or secrets.token_hex(4)}{SUFFIX}"


def save(trace: Trace, attention: AttentionStore | None, json_path: str | Path) -> Path:
    """Write trace.json and its companion as a pair; return trace.json's path."""
    return save_pair(trace, attention, json_path)[0]


def save_pair(trace: Trace, attention: AttentionStore | None, json_path: str | Path) -> tuple[Path, str | None]:
    """Write trace.json and its companion as a pair; return trace.json's path and the companion's name.

    A companion already inside the target folder (the CLI records straight there) is renamed into
    place; one elsewhere (the app's temporary folder) is copied.
    """
    json_path = Path(json_path)
    folder = json_path.parent
    folder.mkdir(parents=True, exist_ok=True)
    keep: set[str] = set()
    if attention is not None and trace.attention is not None:
        name = companion_name(json_path)
        if attention.path.parent.resolve() == folder.resolve() and attention.finished_on_disk():
            os.replace(attention.path, folder / name)  # recorded right here (the CLI): no copy
            attention.path = folder / name
        else:
            _atomic_write(folder / name, attention.write_to)
        keep.add(name)
        trace = trace.model_copy(update={"attention": trace.attention.model_copy(update={"file": name})})
    elif trace.attention is not None:
        trace = trace.model_copy(update={"attention": trace.attention.model_copy(update={"file": None})})
    _atomic_write(json_path, dumps(trace).encode("utf-8"))
    clean_leftovers(json_path, keep)
    return json_path, next(iter(keep), None)


def clean_leftovers(json_path: Path, keep: set[str]) -> None:
    """Remove companions trace.json no longer names, and temporary files of killed saves."""
    stem, now = json_path.name.removesuffix(".json"), time.time()
    for p in json_path.parent.iterdir():
        old_pair = p.name.startswith(stem + ".") and (p.name.endswith(SUFFIX) or p.name == stem + ".attn.npz")
        temp = p.name.startswith("." + stem + ".") and p.name.endswith((".tmp", ".part"))
        try:
            if (old_pair and p.name not in keep) or (temp and now - p.stat().st_mtime > STALE_S):
                p.unlink()
        except OSError:
            pass  # another process removed it first, or it is not ours to remove


def recording_path(json_path: str | Path) -> Path:
    """Where a run records its companion when it will be saved next to json_path (renamed on save)."""
    json_path = Path(json_path)
    return json_path.parent / f".{json_path.name.removesuffix('.json')}.{secrets.token_hex(4)}{SUFFIX}.part"


def _atomic_write(path: Path, data) -> None:
    """Write bytes, or call `data(file)` to stream them, into a temp file, then rename it into place."""
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; saved traces are meant to be shared
        with os.fdopen(fd, "wb") as fh:
            fh.write(data) if isinstance(data, bytes) else data(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_companion(store: AttentionStore, trace: Trace) -> AttentionStore:
    """The companion must describe exactly this trace's attention: same shape, steps and cells."""
    info = trace.attention
    if info is None:
        raise TraceError("trace has no attention section, so no companion belongs to it")
    s = store.shape
    want = (info.layers, info.heads, trace.prompt_len, info.prompt_cells, len(trace.steps), info.dtype)
    got = (s.layers, s.heads, s.prompt_len, s.bins, store.steps, s.dtype)
    if got != want:
        names = "layers, heads, prompt tokens, prompt cells, steps, dtype"
        raise TraceError(f"attention companion is for ({names}) = {got}; this trace needs {want}")
    edges = store.edges()
    if edges[0] != 0 or edges[-1] != trace.prompt_len or (edges[1:] <= edges[:-1]).any():
        raise TraceError("attention companion's prompt cell edges are not increasing from 0 to the prompt length")
    return store


def open_companion(path: Path, trace: Trace, work_dir: Path | None = None) -> tuple[Trace, AttentionStore]:
    """Open (or, for a schema-1 .attn.npz, convert into work_dir) the companion of `trace`."""
    if path.name.endswith(".attn.npz"):
        folder = work_dir or Path(tempfile.mkdtemp(prefix="explorer-load-"))
        return legacy.convert(path.read_bytes(), trace, folder / ("converted" + SUFFIX))
    try:
        return trace, check_companion(open_store(path), trace)
    except AttentionFileError as exc:
        raise TraceError(str(exc)) from None


def load(json_path: str | Path) -> tuple[Trace, AttentionStore | None]:
    """Load trace.json and, when it names one that exists, its attention companion."""
    json_path = Path(json_path)
    try:
        size = json_path.stat().st_size
        if size > MAX_TRACE_BYTES:
            raise TraceError(
                f"{json_path.name} is {size / 2**20:.1f} MiB, over the {MAX_TRACE_BYTES / 2**20:.0f} MiB limit for traces"
            )
        trace = parse(json_path.read_bytes())
    except OSError as exc:
        raise TraceError(f"cannot read {json_path}: {exc.strerror}") from None
    info = trace.attention
    if info is None or info.file is None:
        return trace, None
    comp = json_path.parent / Path(info.file).name  # never follow a path out of the trace's folder
    if not comp.is_file():
        return trace, None
    return open_companion(comp, trace)

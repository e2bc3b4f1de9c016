"""Admission: the one door every trace comes in by (upload, zip, Saved runs, `tracefile.load`, replay,
explain, `Trace.load`, schema-1 conversion).

From the declared sizes alone it decides what the file may cost before anything is built from them:
trace.json is read with a byte cap from a regular file only, parsed by the schema (every list bounded
and cross-checked against the model's shape), and measured as the tool will write it back; the
companion's metadata must equal the trace's declared shape before its entries are looked at, its size
must equal what that shape takes, and every weight must be a probability. A schema-1 companion is
converted only within the budget a new run gets. What is admitted cannot grow later: every view, save
and export is built from these bounded sizes (views within their cell budgets, the export from each
branch's own steps).
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

from . import legacy
from .attnstore import AttentionFileError, AttentionStore, Shape, check_values, file_bytes, open_store
from .limits import Limits
from .trace import MAX_TRACE_BYTES, Trace, TraceError, parse

CONVERTED = "converted.attn.safetensors"


@dataclass(frozen=True)
class Cost:
    """What an admitted trace costs, from its declared sizes."""

    json_bytes: int  # trace.json as the tool writes it back (compact)
    stored_steps: int  # the main run's steps and every branch's own steps
    explanation_cells: int  # layer × head cells of every kept breakdown and sweep
    companion_bytes: int  # the companion its attention section declares (0 without one)


def cost_of(trace: Trace, text: str | None = None) -> Cost:
    info = trace.attention
    companion = file_bytes(companion_shape(trace), len(trace.steps)) if info is not None else 0
    return Cost(
        json_bytes=len((text if text is not None else trace.model_dump_json()).encode("utf-8")),
        stored_steps=len(trace.steps) + sum(len(b.steps) for b in trace.branches),
        explanation_cells=sum(
            len(e.components.heads) * len(next(iter(e.components.heads), [])) for e in trace.explanations
        )
        + sum(len(w.heads) * len(next(iter(w.heads), [])) for w in trace.sweeps),
        companion_bytes=companion,
    )


def room(trace: Trace) -> int:
    """Bytes a trace may still grow by (a kept explanation, a branch) and stay under the cap when saved."""
    return MAX_TRACE_BYTES - len(trace.model_dump_json().encode("utf-8"))


def companion_shape(trace: Trace) -> Shape:
    info = trace.attention
    return Shape(info.layers, info.heads, trace.prompt_len, info.prompt_cells, info.dtype)


def admit_trace(data: bytes | str) -> Trace:
    """trace.json bytes -> a Trace whose every later save stays under the size cap, or one TraceError."""
    trace = parse(data)
    size = cost_of(trace).json_bytes
    if size > MAX_TRACE_BYTES:
        raise TraceError(
            f"this trace written back takes {size / 2**20:.1f} MiB, over the {MAX_TRACE_BYTES / 2**20:.0f} MiB "
            "limit for traces: its numbers are spelled longer than the file spells them"
        )
    return trace


def read_capped(path: Path, cap: int) -> bytes:
    """A regular file's bytes, at most `cap` of them: never a link, a FIFO or a device."""
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            raise TraceError(f"{path.name} is not a regular file (a link, a pipe or a device): refused")
        if st.st_size > cap:
            raise TraceError(f"{path.name} is {st.st_size / 2**20:.1f} MiB, over the {cap / 2**20:.0f} MiB limit")
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise TraceError(f"{path.name} is not a regular file: refused")
            data = fh.read(cap + 1)
    except OSError as exc:
        raise TraceError(f"cannot read {path.name}: {exc.strerror}") from None
    if len(data) > cap:
        raise TraceError(f"{path.name} grew past the {cap / 2**20:.0f} MiB limit while being read")
    return data


def admit_companion(
    path: Path, trace: Trace, work_dir: Path | None = None, limits: Limits | None = None
) -> tuple[Trace, AttentionStore]:
    """Open (or, for a schema-1 .attn.npz, convert into work_dir) the companion of an admitted trace."""
    if trace.attention is None:
        raise TraceError("trace has no attention section, so no companion belongs to it")
    lim = limits or Limits.from_env()
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            raise TraceError(f"{path.name} is not a regular file (a link, a pipe or a device): refused")
    except OSError as exc:
        raise TraceError(f"cannot read {path.name}: {exc.strerror}") from None
    if path.name.endswith(".attn.npz"):
        if lim.hosted and trace.prompt_len > lim.max_prompt_tokens:  # converting costs like recording
            raise TraceError(
                f"converting this schema-1 trace's {trace.prompt_len}-token prompt is over this host's limit of "
                f"{lim.max_prompt_tokens} (EXPLORER_MAX_PROMPT_TOKENS); convert it locally and upload the result"
            )
        if work_dir is not None:
            return legacy.convert(path, trace, work_dir / CONVERTED, lim.attention_budget_mb * 2**20)
        folder = Path(tempfile.mkdtemp(prefix="explorer-load-"))
        try:
            trace, store = legacy.convert(path, trace, folder / CONVERTED, lim.attention_budget_mb * 2**20)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        weakref.finalize(store, shutil.rmtree, folder, True)  # the converted copy lives as long as its store
        return trace, store
    declared = cost_of(trace).companion_bytes
    if declared > lim.attention_budget_mb * 2**20:  # the same budget a new run's recording is held to
        raise TraceError(
            f"this trace's attention companion takes {declared / 2**20:,.0f} MB, over the budget of "
            f"{lim.attention_budget_mb:,} MB a run may record here (EXPLORER_ATTENTION_BUDGET_MB)"
        )
    try:
        store = open_store(path, expect=(companion_shape(trace), len(trace.steps)))
        _check_pair(store, trace)
        check_values(store)
    except AttentionFileError as exc:
        raise TraceError(str(exc)) from None
    return trace, store


def _check_pair(store: AttentionStore, trace: Trace) -> None:
    """Bound to this trace: the same run id (when both carry one) and cell edges from 0 to the prompt."""
    want = trace.attention.run
    if want is not None and store.run != want:
        raise AttentionFileError(
            f"attention companion {store.path.name} belongs to another run (run {store.run or 'unnamed'}, "
            f"the trace names {want}): choose the companion saved with this trace.json"
        )
    edges = store.edges()
    if edges[0] != 0 or edges[-1] != trace.prompt_len or (edges[1:] <= edges[:-1]).any():
        raise AttentionFileError(
            "attention companion's prompt cell edges are not increasing from 0 to the prompt length"
        )


def admit_file(json_path: str | Path, limits: Limits | None = None) -> tuple[Trace, AttentionStore | None]:
    """trace.json on disk and, when it names one that exists beside it, its companion."""
    json_path = Path(json_path)
    trace = admit_trace(read_capped(json_path, MAX_TRACE_BYTES))
    info = trace.attention
    if info is None or info.file is None:
        return trace, None
    comp = json_path.parent / Path(info.file).name  # never follow a path out of the trace's folder
    if not os.path.lexists(comp):
        return trace, None
    return admit_companion(comp, trace, limits=limits)

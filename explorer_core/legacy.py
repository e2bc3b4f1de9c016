"""Schema-1 attention companions (`trace.attn.npz`): checked, then converted to the current store in a stream.

A schema-1 companion held the prompt's full (layers, heads, T, T) attention and every step's row,
float16 split into two byte planes (low bytes, then high bytes) inside a compressed npz. The .npy
headers are checked against the trace, and the converted file's size against the budget a new run
gets, before anything is inflated. Conversion then reads both planes side by side in pieces: the
prompt is pooled one query cell at a time, and each (layer, head)'s rows are written straight to
their place in the new file. Memory stays at a few cell rows whatever the prompt's length.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from .attnstore import AttentionStore, AttentionWriter, Shape, file_bytes, open_store, prompt_layout
from .recorder import PROMPT_BUDGET_BYTES
from .trace import Trace, TraceError

MAX_INFLATED_BYTES = 2 * 1024**3
ERRORS = (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError, RuntimeError)


def _header(zf: zipfile.ZipFile, name: str):
    """An open member positioned at its data, with the shape and dtype its .npy header declares."""
    fh = zf.open(name + ".npy")
    version = np.lib.format.read_magic(fh)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(fh)
    if fortran:
        raise TraceError(f"attention companion's {name} is stored in Fortran order, which schema 1 never wrote")
    return fh, tuple(shape), np.dtype(dtype)


def _check(headers: dict, trace: Trace) -> None:
    info, t = trace.attention, trace.prompt_len
    n, total = len(trace.steps), sum(t + i for i in range(len(trace.steps)))
    want = {
        "prompt": ((2, info.layers * info.heads * t * t), "uint8"),  # byte planes of float16
        "rows": ((2, info.layers * info.heads * total), "uint8"),
        "lengths": ((n,), "<i8"),
    }
    for name, (shape, dtype) in want.items():
        got_shape, got_dtype = headers[name]
        if got_shape != shape or got_dtype != np.dtype(dtype):
            raise TraceError(
                f"attention companion's {name} is {got_dtype} {got_shape}; the trace's {n} steps need {dtype} {shape}"
            )
    size = 2 * (info.layers * info.heads * (t * t + total))
    if size > MAX_INFLATED_BYTES:
        raise TraceError(
            f"attention companion would inflate to {size / 2**30:.1f} GiB, over the "
            f"{MAX_INFLATED_BYTES / 2**30:.0f} GiB limit for schema-1 companions"
        )


def target_shape(trace: Trace) -> Shape:
    """The current store a schema-1 companion of this trace converts to (the rule a new run uses)."""
    info, t = trace.attention, trace.prompt_len
    _, edges = prompt_layout(PROMPT_BUDGET_BYTES, info.layers, info.heads, t)
    return Shape(info.layers, info.heads, t, len(edges) - 1)


def converted_bytes(trace: Trace) -> int:
    return file_bytes(target_shape(trace), len(trace.steps))


class _Planes:
    """Reads float16 values from two byte planes of one member, opened twice and read side by side."""

    def __init__(self, zf: zipfile.ZipFile, name: str, stack: ExitStack) -> None:
        self.lo, shape, _ = _header(zf, name)
        self.hi, _, _ = _header(zf, name)
        stack.enter_context(self.lo)
        stack.enter_context(self.hi)
        _skip(self.hi, shape[1])

    def read(self, n: int) -> np.ndarray:
        lo, hi = self.lo.read(n), self.hi.read(n)
        if len(lo) != n or len(hi) != n:
            raise TraceError("attention companion ends early: truncated")
        v = (np.frombuffer(hi, np.uint8).astype(np.uint16) << 8 | np.frombuffer(lo, np.uint8)).view(np.float16)
        if v.size and not (np.isfinite(v).all() and v.min() >= 0 and v.max() <= 1.001):
            raise TraceError("attention companion holds values outside [0, 1] or not finite")
        return v


def _skip(fh, n: int, piece: int = 1 << 20) -> None:
    while n > 0:
        got = len(fh.read(min(piece, n)))
        if got == 0:
            raise TraceError("attention companion ends early: truncated")
        n -= got


def _prompt_layers(planes: _Planes, shape: Shape, edges: np.ndarray):
    """Yield each layer's (heads, B, B) pooled cells: the mean weight over each cell's query-key pairs."""
    t, sizes = shape.prompt_len, np.diff(edges).astype(np.float32)
    for _ in range(shape.layers):
        cells = np.zeros((shape.heads, shape.bins, shape.bins), np.float32)
        for h in range(shape.heads):
            for c, (q0, q1) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
                block = planes.read(int(q1 - q0) * t).reshape(int(q1 - q0), t).astype(np.float32)
                cells[h, c] = np.add.reduceat(block, edges[:-1], axis=1).sum(axis=0)
        yield cells / (sizes[:, None] * sizes[None, :])


def _rows(planes: _Planes, writer: AttentionWriter, lengths: np.ndarray) -> None:
    """Source order is (layer, head, step); each segment goes to its place in step s's (layers, heads, T+s)."""
    s, fd = writer.shape, writer.fileno()
    starts = writer.reserve_rows(len(lengths))
    for layer in range(s.layers):
        for head in range(s.heads):
            for step, n in enumerate(lengths.tolist()):
                seg = planes.read(n)
                os.pwrite(fd, seg.tobytes(), starts[step] + (layer * s.heads + head) * n * 2)


def convert(source: Path, trace: Trace, path: Path, budget_bytes: int | None = None) -> tuple[Trace, AttentionStore]:
    """Write a schema-1 companion's contents as a current store at `path`; return the trace that names it.

    budget_bytes: the most a new run may record (Limits.attention_budget_mb); a conversion that would
    write more is refused before anything is inflated."""
    shape = target_shape(trace)
    size = converted_bytes(trace)
    if budget_bytes is not None and size > budget_bytes:
        raise TraceError(
            f"converting this schema-1 attention writes {size / 2**20:,.0f} MB, over the budget of "
            f"{budget_bytes / 2**20:,.0f} MB a new run gets (EXPLORER_ATTENTION_BUDGET_MB)"
        )
    try:
        return _convert(source, trace, path, shape)
    except TraceError:
        raise
    except ERRORS as exc:
        raise TraceError(f"attention companion is not readable: {str(exc)[:200]}") from None


def _convert(source: Path, trace: Trace, path: Path, shape: Shape) -> tuple[Trace, AttentionStore]:
    with zipfile.ZipFile(source) as zf, ExitStack() as stack:
        names = zf.namelist()
        if len(names) != len(set(names)):
            raise TraceError("attention companion holds the same member twice")
        headers = {}
        for name in ("prompt", "rows", "lengths"):
            fh, dims, dtype = _header(zf, name)
            fh.close()
            headers[name] = (dims, dtype)
        _check(headers, trace)
        with _header(zf, "lengths")[0] as fh:
            lengths = np.frombuffer(fh.read(8 * len(trace.steps)), "<i8")
        if not np.array_equal(lengths, np.arange(len(trace.steps)) + trace.prompt_len):
            raise TraceError(f"attention companion's row lengths do not match the trace's {len(trace.steps)} steps")
        _, edges = prompt_layout(PROMPT_BUDGET_BYTES, shape.layers, shape.heads, shape.prompt_len)
        writer = AttentionWriter(path, shape, max_steps=len(lengths))
        stack.callback(writer.close)
        writer.write_prompt_layers(_prompt_layers(_Planes(zf, "prompt", stack), shape, edges), edges)
        _rows(_Planes(zf, "rows", stack), writer, lengths)
        writer.finish()
    info = trace.attention.model_copy(update={"file": path.name, "prompt_cells": shape.bins, "run": writer.run})
    return trace.model_copy(update={"attention": info}), open_store(path)

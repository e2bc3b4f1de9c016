"""Schema-1 attention companions (`trace.attn.npz`): read them safely and convert to the current store.

A schema-1 companion held the prompt's full (layers, heads, T, T) attention and every step's row,
float16 as byte planes inside a compressed npz. Reading checks the .npy headers against the trace
before inflating anything; conversion pools the prompt to the same byte budget a new run uses.
"""

from __future__ import annotations

import io
import zipfile
import zlib
from pathlib import Path

import numpy as np

from .attnstore import AttentionStore, pooling_edges, prompt_layout
from .recorder import PROMPT_BUDGET_BYTES
from .trace import Trace, TraceError

MAX_INFLATED_BYTES = 2 * 1024**3


def _headers(data: bytes) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of each array, read from the .npy headers before any data."""
    out = {}
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        names = zf.namelist()
        if len(names) != len(set(names)):
            raise TraceError("attention companion holds the same member twice")
        for name in ("prompt", "rows", "lengths"):
            with zf.open(name + ".npy") as fh:
                version = np.lib.format.read_magic(fh)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(fh)
            out[name] = (tuple(shape), np.dtype(dtype))
    return out


def _check(headers: dict, trace: Trace) -> None:
    info, t = trace.attention, trace.prompt_len
    n, total = len(trace.steps), sum(t + i for i in range(len(trace.steps)))
    want = {
        "prompt": ((2, info.layers * info.heads * t * t), "uint8"),  # byte planes of float16
        "rows": ((2, info.layers * info.heads * total), "uint8"),
        "lengths": ((n,), "int64"),
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
            f"attention companion would take {size / 2**30:.1f} GiB in memory, over the "
            f"{MAX_INFLATED_BYTES / 2**30:.0f} GiB limit for schema-1 companions"
        )


def _unplane(planes: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return planes.T.copy().view(np.float16).reshape(shape)


def read_npz(data: bytes, trace: Trace) -> tuple[np.ndarray, list[np.ndarray]]:
    """(prompt (layers, heads, T, T), rows [(layers, heads, T+s)]) float16 from a schema-1 companion."""
    errors = (
        OSError,
        ValueError,
        KeyError,
        zipfile.BadZipFile,
        EOFError,
        zlib.error,
        NotImplementedError,
        RuntimeError,
    )
    try:
        _check(_headers(data), trace)
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            prompt_planes, row_planes, lengths = npz["prompt"], npz["rows"], npz["lengths"]
    except TraceError:
        raise
    except errors as exc:
        raise TraceError(f"attention companion is not readable: {exc}") from None
    t, info = trace.prompt_len, trace.attention
    if not np.array_equal(lengths, np.arange(len(trace.steps)) + t):
        raise TraceError(f"attention companion's row lengths do not match the trace's {len(trace.steps)} steps")
    prompt = _unplane(prompt_planes, (info.layers, info.heads, t, t))
    rows = _unplane(row_planes, (info.layers, info.heads, int(lengths.sum())))
    for name, arr in (("prompt", prompt), ("rows", rows)):
        if arr.size and (not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1.001):
            raise TraceError(f"attention companion's {name} holds values outside [0, 1] or not finite")
    split = np.cumsum(lengths)[:-1]
    return prompt, (list(np.split(rows, split, axis=-1)) if len(lengths) else [])


def pool(prompt: np.ndarray, width: int) -> np.ndarray:
    """(layers, heads, T, T) -> (layers, heads, B, B): mean weight over each cell's query-key pairs."""
    layers, heads, t, _ = prompt.shape
    edges = pooling_edges(t, width)
    sums = np.add.reduceat(np.add.reduceat(prompt.astype(np.float32), edges[:-1], axis=2), edges[:-1], axis=3)
    sizes = np.diff(edges).astype(np.float32)
    return sums / (sizes[:, None] * sizes[None, :])


def convert(data: bytes, trace: Trace, path: Path) -> tuple[Trace, AttentionStore]:
    """Write a schema-1 companion's contents as a current store at `path`; return the trace that names it."""
    from .attnstore import AttentionWriter, Shape, open_store

    prompt, rows = read_npz(data, trace)
    layers, heads, t, _ = prompt.shape
    width, edges = prompt_layout(PROMPT_BUDGET_BYTES, layers, heads, t)
    writer = AttentionWriter(path, Shape(layers, heads, t, len(edges) - 1), max_steps=len(rows))
    try:
        writer.write_prompt(pool(prompt, width), edges)
        for r in rows:
            writer.write_row(r)
        writer.finish()
    finally:
        writer.close()
    info = trace.attention.model_copy(update={"file": path.name, "prompt_cells": len(edges) - 1})
    return trace.model_copy(update={"attention": info}), open_store(path)

"""Attention views of any length: heatmap cells, one query's row, a layer's heads, snapshot rows.

Every builder takes a cell budget (`max_bins` cells per axis) and returns at most max_bins² cells
whatever the sequence length, so neither pandas nor Vega ever receives a quadratic number of rows.
A cell's value is the mean attention weight over the query-key pairs it covers; with one position
per cell that is the weight itself. Rows of generated tokens are exact (from their stored rows);
prompt rows come from the companion's pooled cells (exact when the prompt fitted its budget), or
from an exact recomputation when the caller passes one (recompute.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .attnstore import AttentionStore, pooling_width
from .trace import Trace

DEFAULT_BINS = 160  # heatmap cells per axis: 12,880 cells at most in a lower triangle
MAX_BINS = 512
ROW_BINS = 400
HEAD_BINS = 40
MAX_HEADS_SHOWN = 16
MAX_SNAPSHOT_ROWS = 120
HEATMAP_COLUMNS = ["q0", "q1", "k0", "k1", "weight", "q_name", "k_name", "is_step"]


def display_edges(lo: int, hi: int, max_bins: int, split: int | None = None) -> np.ndarray:
    """Cell boundaries over positions lo..hi, equal widths, with `split` (the prompt's end) an edge."""
    max_bins = int(min(max(max_bins, 1), MAX_BINS))
    width = pooling_width(hi - lo, max_bins)
    edges = np.append(np.arange(lo, hi, width, dtype=np.int64), np.int64(hi))
    if split is not None and lo < split < hi and split not in edges:
        edges = np.sort(np.append(edges, np.int64(split)))
    return edges


def overlap(display: np.ndarray, stored: np.ndarray) -> np.ndarray:
    """(n, m): share of display cell a covered by stored cell i (rows sum to the covered fraction)."""
    lo = np.maximum(display[:-1, None], stored[None, :-1])
    hi = np.minimum(display[1:, None], stored[None, 1:])
    return np.clip(hi - lo, 0, None) / np.diff(display)[:, None]


def _row_means(row: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Mean weight per key cell of one query's row (keys past the row's end count as zero)."""
    ends = np.minimum(edges, len(row))
    csum = np.concatenate([[0.0], np.cumsum(row, dtype=np.float64)])
    return (csum[ends[1:]] - csum[ends[:-1]]) / np.diff(edges)


def _label(trace_labels: list[str], a: int, b: int) -> str:
    if b - a == 1:
        return f"{a}: {trace_labels[a] if a < len(trace_labels) else '?'}"
    return f"{a}–{b - 1}"


@dataclass(frozen=True)
class Window:
    """Positions lo..hi-1 of the sequence seen at one step, in at most `bins` cells per axis."""

    lo: int
    hi: int
    bins: int = DEFAULT_BINS

    @classmethod
    def clamp(cls, lo: int | None, hi: int | None, length: int, bins: int = DEFAULT_BINS) -> Window:
        lo = 0 if lo is None else max(0, min(int(lo), length - 1))
        hi = length if hi is None else max(lo + 1, min(int(hi), length))
        return cls(lo, hi, int(min(max(bins, 1), MAX_BINS)))


def heatmap_frame(
    trace: Trace,
    store: AttentionStore,
    step: int,
    layer: int,
    head: int | None,
    window: Window | None = None,
    prompt_rows: tuple[int, np.ndarray] | None = None,
) -> pd.DataFrame:
    """Cells of the lower-triangular attention seen at `step` (prompt + tokens before it).

    Rows are query positions; the query of step `step` itself is the last row (is_step). prompt_rows:
    (first position, (q, T) exact rows) recomputed for this layer and head, used where they cover.
    """
    t, length = trace.prompt_len, trace.prompt_len + step
    w = window or Window.clamp(None, None, length)
    edges = display_edges(w.lo, w.hi, w.bins, split=t)
    grid = np.zeros((len(edges) - 1, len(edges) - 1))
    ptop = int(np.searchsorted(edges, min(t, w.hi)))  # cells [0, ptop) hold prompt queries
    if ptop:
        grid[:ptop] = _prompt_grid(store, layer, head, edges[: ptop + 1], edges, prompt_rows)
    for a in range(ptop, len(edges) - 1):  # generated queries: exact rows, averaged per cell
        positions = range(int(edges[a]), int(edges[a + 1]))
        grid[a] = np.mean([_row_means(store.row(p - t + 1, layer, head), edges) for p in positions], axis=0)
    return _cells(grid, edges, trace.labels_upto(step) + ["?"], length - 1)


def _prompt_grid(store, layer, head, qedges, kedges, prompt_rows) -> np.ndarray:
    """Prompt query cells: exact rows where given, else the stored pooled cells resampled."""
    stored = store.edges()
    cells = store.prompt_cells(layer, head)  # (B, B)
    grid = overlap(qedges, stored) @ cells @ overlap(kedges, stored).T
    if prompt_rows is not None:
        first, rows = prompt_rows
        for a in range(len(qedges) - 1):
            q0, q1 = int(qedges[a]), int(qedges[a + 1])
            if first <= q0 and q1 <= first + len(rows):
                grid[a] = np.mean([_row_means(rows[p - first][: p + 1], kedges) for p in range(q0, q1)], axis=0)
    return grid


def _cells(grid: np.ndarray, edges: np.ndarray, labels: list[str], step_pos: int) -> pd.DataFrame:
    """Lower-triangle cells of a grid as tidy rows."""
    qa, kb = np.nonzero(
        edges[:-1][None, :] <= (edges[1:] - 1)[:, None]
    )  # key cell starts at or before the query cell ends
    q0, q1, k0, k1 = edges[qa], edges[qa + 1], edges[kb], edges[kb + 1]
    return pd.DataFrame(
        {
            "q0": q0,
            "q1": q1,
            "k0": k0,
            "k1": k1,
            "weight": grid[qa, kb].astype(float),
            "q_name": [_label(labels, int(a), int(b)) for a, b in zip(q0, q1)],
            "k_name": [_label(labels, int(a), int(b)) for a, b in zip(k0, k1)],
            "is_step": (q0 <= step_pos) & (step_pos < q1),
        },
        columns=HEATMAP_COLUMNS,
    )


def row_frame(
    trace: Trace,
    store: AttentionStore,
    step: int,
    layer: int,
    head: int | None,
    max_bins: int = ROW_BINS,
    lo: int = 0,
    hi: int | None = None,
) -> pd.DataFrame:
    """Where step `step`'s query looked: its row's attention mass per cell of positions lo..hi-1 (the
    whole row sums to 1, or to less where the model's softmax also covers a sink: see row_sum)."""
    row = store.row(step, layer, head)
    hi = len(row) if hi is None else min(int(hi), len(row))
    lo = min(max(0, int(lo)), hi - 1)
    edges = display_edges(lo, hi, max_bins, split=trace.prompt_len)
    mass = _row_means(row, edges) * np.diff(edges)
    labels = trace.labels_upto(step)
    return pd.DataFrame(
        {
            "k0": edges[:-1],
            "k1": edges[1:],
            "weight": mass,
            "k_name": [_label(labels, int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])],
            "part": np.where(edges[:-1] < trace.prompt_len, "prompt", "generated"),
        }
    )


def row_sum(frame: pd.DataFrame) -> float:
    """The attention a row puts on the sequence: 1 for most models, less with attention sinks (gpt-oss)."""
    return float(frame["weight"].sum())


SINK_NOTE_BELOW = 0.99  # float16 storage rounds a full row's sum by far less than this


def heads_frame(
    trace: Trace,
    store: AttentionStore,
    step: int,
    layer: int,
    heads: list[int] | None = None,
    window: Window | None = None,
) -> pd.DataFrame:
    """Small heatmaps of several heads of one layer (at most MAX_HEADS_SHOWN), with a `head` column."""
    heads = list(range(store.heads))[:MAX_HEADS_SHOWN] if heads is None else heads[:MAX_HEADS_SHOWN]
    length = trace.prompt_len + step
    w = window or Window.clamp(length - 48, None, length, HEAD_BINS)
    w = Window(w.lo, w.hi, min(w.bins, HEAD_BINS))
    parts = []
    for h in heads:
        f = heatmap_frame(trace, store, step, layer, h, w)
        f.insert(0, "head", h)
        parts.append(f)
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["head", *HEATMAP_COLUMNS])


def snapshot_frame(trace: Trace, max_rows: int = MAX_SNAPSHOT_ROWS, max_bins: int = DEFAULT_BINS) -> pd.DataFrame:
    """The head-mean last-layer snapshot rows stored inside trace.json, at most max_rows × max_bins cells."""
    snaps = [s for s in trace.steps if s.attn_snapshot is not None]
    if len(snaps) > max_rows:  # evenly spaced, first and last kept
        snaps = [snaps[i] for i in np.unique(np.linspace(0, len(snaps) - 1, max_rows).round().astype(int))]
    cols = ["step", "k0", "k1", "k_name", "label", "weight"]
    if not snaps:
        return pd.DataFrame(columns=cols)
    length = trace.prompt_len + snaps[-1].step
    edges = display_edges(0, max(length, 1), max_bins, split=trace.prompt_len)
    labels = trace.labels_upto(snaps[-1].step)
    names = [_label(labels, int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]
    parts = []
    for s in snaps:
        means = _row_means(np.asarray(s.attn_snapshot, dtype=np.float64), edges)
        n = int(np.searchsorted(edges, len(s.attn_snapshot), side="left"))
        parts.append(
            pd.DataFrame(
                {
                    "step": s.step,
                    "k0": edges[:n],
                    "k1": edges[1 : n + 1],
                    "k_name": names[:n],
                    "label": s.label,
                    "weight": means[:n],
                }
            )
        )
    return pd.concat(parts, ignore_index=True)[cols]

"""One run's attention recorder: pools the prompt's attention as the prefill computes it, then hands
each step's row to the companion writer, so memory stays flat however long the prompt is.

Weights arrive on the device of the layer that computed them (with a device map, layers sit on
several GPUs, the CPU or disk offload). Pooling reduces a chunk where it was computed and moves only
the reduced cells; each step's row moves to the host once, one copy per device holding layers.

Memory held: the pooled prompt cells (layers × heads × B × B float32, a few MB), one chunk of one
layer's weights at a time (capture.CHUNK_BYTES), and the pending row of the next step
(layers × heads × (T+s) float32). Nothing grows with the number of steps.
"""

from __future__ import annotations

import shutil
from itertools import groupby
from pathlib import Path

import numpy as np
import torch

from .attnstore import AttentionStore, AttentionWriter, Shape, prompt_layout

TEMP_PREFIX = "explorer-run-"  # a run's own temporary folder, when the caller gave no path
PROMPT_BUDGET_BYTES = (
    40 * 1024 * 1024
)  # pooled prompt attention on disk (float16): exact up to 278 tokens on the default model


class AttentionRecorder:
    """A capture.Sink for one run (batch 1)."""

    def __init__(
        self,
        path: str | Path,
        layers: int,
        heads: int,
        prompt_len: int,
        max_steps: int,
        dtype: str = "float16",
        prompt_budget_bytes: int = PROMPT_BUDGET_BYTES,
    ) -> None:
        itemsize = 2 if dtype == "float16" else 4
        self.width, self.edges = prompt_layout(prompt_budget_bytes, layers, heads, prompt_len, itemsize)
        self.shape = Shape(layers, heads, prompt_len, len(self.edges) - 1, dtype)
        self.writer = AttentionWriter(path, self.shape, max_steps)
        self._cells: torch.Tensor | None = None  # (layers, heads, B, B) sums during the prefill
        self._last: list[torch.Tensor | None] = [None] * layers  # per layer: (heads, keys) newest row
        self._prefill_len = 0
        self._host_row: torch.Tensor | None = None  # pending() on the host, until the next forward's rows
        self.finished = False
        self.precision = "float32"  # capture.PRECISIONS: how a half-precision model's weights are computed
        self.way = "own"  # capture.WAYS: the model's own eager function, or the fast copy fidelity proved equal
        self.positions = prompt_len  # positions after the current forward: where a sliding cache's keys start
        self.delivered: set[int] = set()  # layers that handed on weights in any forward

    # -- capture.Sink ---------------------------------------------------------------------------
    def rows(self, layer: int, start: int, weights: torch.Tensor, first_key: int = 0) -> None:
        """weights: (heads, c, keys) for queries start..start+c-1 of the current forward, keys from
        absolute position first_key (past 0 only in a cached step of a sliding-window layer)."""
        self._host_row = None
        self.delivered.add(layer)
        if self._prefill_len:
            self._pool(layer, start, weights)
        if not self._prefill_len:  # a cached step's (heads, 1, keys) weights are fresh: keep a view
            row = weights[:, -1]  # keys before the window weigh zero: rows are stored by absolute position
            self._last[layer] = torch.nn.functional.pad(row, (first_key, 0)) if first_key else row
        elif start + weights.shape[1] == self._prefill_len:  # the prompt's last row, cut out of its chunk
            self._last[layer] = weights[:, -1, : self._prefill_len].clone()

    @property
    def key_multiple(self) -> int:
        """Asked of capture.attention_weights: key widths a multiple of the cell width pool by a reshape."""
        return self.width if self._prefill_len else 1

    def _pool(self, layer: int, start: int, w: torch.Tensor) -> None:
        """Add a chunk's weights into the prompt cells: sum over each cell's keys and queries."""
        heads, c, width = w.shape  # width: a multiple of the cell width (capture pads the keys)
        kw = w.view(heads, c, width // self.width, self.width).sum(-1)  # (heads, c, cells seen)
        qcell = torch.div(torch.arange(start, start + c, device=w.device), self.width, rounding_mode="floor")
        first, last = start // self.width, (start + c - 1) // self.width  # the chunk's query cells
        summed = torch.zeros(heads, last + 1 - first, kw.shape[-1], device=w.device)
        summed.index_add_(1, qcell - first, kw)  # (heads, query cells of this chunk, cells seen): small
        self._cells[layer][:, first : first + summed.shape[1], : kw.shape[-1]] += summed.cpu()

    def start_prefill(self, length: int) -> None:
        self._prefill_len = self.positions = length
        self._cells = torch.zeros(self.shape.layers, self.shape.heads, self.shape.bins, self.shape.bins)

    def end_prefill(self) -> None:
        """Turn the cell sums into means over each cell's query-key pairs and write them."""
        sizes = torch.from_numpy(np.diff(self.edges)).float()  # (B,)
        means = self._cells.div_(sizes[:, None] * sizes[None, :])  # in place: a copy was a second set of cells
        self.writer.write_prompt(means, self.edges)
        self._cells, self._prefill_len = None, 0

    # -- steps ----------------------------------------------------------------------------------
    def pending(self) -> torch.Tensor:
        """(layers, heads, keys) float32 on the host: the row the next committed step will record.

        Consecutive layers on one device are stacked there and copied once; the copy is kept, so the
        step's record and its commit share it.
        """
        if not self.delivered:
            raise RuntimeError("no attention row was captured for this step")
        if self._host_row is None:
            rows = self._rows()
            parts = [torch.stack(list(group)).cpu() for _, group in groupby(rows, key=lambda r: r.device)]
            self._host_row = parts[0] if len(parts) == 1 else torch.cat(parts)  # one device: no second copy
        return self._host_row

    def silent_layers(self) -> list[int]:
        """Layers that never handed on weights: no attention weights there (state-space, convolution,
        recurrent layers of a hybrid); their rows are zeros and the views say so."""
        return [i for i in range(self.shape.layers) if i not in self.delivered]

    def _rows(self) -> list[torch.Tensor]:
        """Each layer's newest row, zeros for a silent layer (the same width and device as a real one)."""
        real = next(r for r in self._last if r is not None)
        return [r if r is not None else torch.zeros_like(real) for r in self._last]

    def commit(self) -> None:
        """Write the pending row as the next step's row (raises OSError when the disk is full)."""
        self.writer.write_row(self.pending())  # converted to the file's dtype in torch (faster than numpy)

    def store(self) -> AttentionStore | None:
        """A reader over the rows so far; None until the prompt's cells are written (prefill done)."""
        return self.writer.reader() if "prompt_bins" in self.writer.index else None

    def finish(self) -> Path:
        if not self.finished:
            self.finished = True
            return self.writer.finish()
        return self.writer.path

    def discard(self) -> None:
        """Remove the companion, and the temporary folder the run made for it (nothing else)."""
        self.writer.close()
        self.writer.path.unlink(missing_ok=True)
        if self.writer.path.parent.name.startswith(TEMP_PREFIX):
            shutil.rmtree(self.writer.path.parent, ignore_errors=True)

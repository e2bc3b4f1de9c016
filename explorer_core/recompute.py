"""Exact prompt attention on demand: rerun the prompt through the model for one layer and a window of rows.

The companion keeps a long prompt's own T×T attention pooled; when the model is at hand, any layer,
head and window of query rows can be recomputed exactly. The forward stops right after the chosen
layer (nothing later is needed) and only covers positions up to the window's last row, so the cost is
at most one partial prefill and the memory one (heads, rows, keys) block.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import numpy as np
import torch

from . import capture, fidelity
from .models import LoadedModel

MAX_ROWS = 512


class _Done(Exception):
    """Raised by the sink once its layer is captured, to skip the rest of the forward."""


class _OneLayer:
    """Writes layer `layer`'s rows q_lo..q_hi-1 into one (heads, rows, keys) block as they arrive.

    Chunks arrive with different key widths (a causal chunk stops at its own last query, a pooling
    sink rounds up), so each is written into place rather than concatenated."""

    def __init__(self, layer: int, q_lo: int, q_hi: int) -> None:
        self.layer, self.q_lo, self.q_hi = layer, q_lo, q_hi
        self.block: torch.Tensor | None = None

    def rows(self, layer: int, start: int, weights: torch.Tensor, first_key: int = 0) -> None:
        if layer != self.layer:
            return
        if self.block is None:
            self.block = torch.zeros(weights.shape[0], self.q_hi - self.q_lo, self.q_hi, dtype=torch.float32)
        a, b = max(self.q_lo, start), min(self.q_hi, start + weights.shape[1])
        if a < b:
            keys = min(weights.shape[-1], self.q_hi - first_key)  # keys past q_hi are padding
            part = weights[:, a - start : b - start, :keys].float().cpu()
            self.block[:, a - self.q_lo : b - self.q_lo, first_key : first_key + keys] = part
        if start + weights.shape[1] >= self.q_hi:
            raise _Done


def _attention_modules(model, layer: int) -> list[torch.nn.Module]:
    return [m for m in model.modules() if getattr(m, "layer_idx", None) == layer]


@contextmanager
def _only_layer(model, layer: int, sink: _OneLayer) -> Iterator[None]:
    """Capture starts when layer `layer` is entered: the layers before it run natively, without
    computing weights nobody reads (on an sdpa model each would otherwise run eager a second time)."""
    stack, opened = ExitStack(), []

    def start(module, args):
        if not opened:  # the first module of that layer (a block, its attention) opens the capture, once
            opened.append(stack.enter_context(capture.capturing(sink)))

    modules = _attention_modules(model, layer)
    handles = [m.register_forward_pre_hook(start) for m in modules]
    try:
        with stack:
            if not modules:  # no module carries its layer index: capture the whole forward
                stack.enter_context(capture.capturing(sink))
            yield
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def prompt_rows(lm: LoadedModel, prompt_ids: list[int], layer: int, q_lo: int, q_hi: int) -> np.ndarray:
    """(heads, q_hi - q_lo, T) float32: the exact attention rows of prompt positions q_lo..q_hi-1."""
    t = len(prompt_ids)
    if not 0 <= layer < lm.n_layers:
        raise ValueError(f"layer {layer} does not exist: the model has layers 0..{lm.n_layers - 1}")
    if not 0 <= q_lo < q_hi <= t or q_hi - q_lo > MAX_ROWS:
        raise ValueError(
            f"rows {q_lo}..{q_hi - 1} are not a window of at most {MAX_ROWS} rows of the {t}-token prompt: "
            f"pick rows between 0 and {t - 1}"
        )
    if not capture.supports(lm.model):
        raise ValueError(f"{lm.source.name}'s attention cannot be captured, so it cannot be recomputed")
    capture.install(lm.model)
    sink = _OneLayer(layer, q_lo, q_hi)
    sink.way = fidelity.way_of(lm)
    ids = torch.tensor([prompt_ids[:q_hi]], dtype=torch.long, device=lm.device)
    try:
        with _only_layer(lm.model, layer, sink):
            lm.model(input_ids=ids, use_cache=False, logits_to_keep=1)
    except _Done:
        pass
    if sink.block is None:
        raise ValueError(f"layer {layer} of {lm.source.name} computes no attention weights: pick an attention layer")
    return np.pad(sink.block.numpy(), ((0, 0), (0, 0), (0, t - q_hi)))  # keys past q_hi are future positions

"""Exact prompt attention on demand: rerun the prompt through the model for one layer and a window of rows.

The companion keeps a long prompt's own T×T attention pooled; when the model is at hand, any layer,
head and window of query rows can be recomputed exactly. The forward stops right after the chosen
layer (nothing later is needed) and only covers positions up to the window's last row, so the cost is
at most one partial prefill and the memory one (heads, rows, keys) block.
"""

from __future__ import annotations

import numpy as np
import torch

from . import capture, fidelity
from .models import LoadedModel

MAX_ROWS = 512


class _Done(Exception):
    """Raised by the sink once its layer is captured, to skip the rest of the forward."""


class _OneLayer:
    def __init__(self, layer: int, q_lo: int, q_hi: int) -> None:
        self.layer, self.q_lo, self.q_hi = layer, q_lo, q_hi
        self.parts: list[torch.Tensor] = []

    def rows(self, layer: int, start: int, weights: torch.Tensor, first_key: int = 0) -> None:
        if layer != self.layer:
            return
        a, b = max(self.q_lo, start), min(self.q_hi, start + weights.shape[1])
        if a < b:
            self.parts.append(weights[:, a - start : b - start].clone())  # (heads, rows, keys)
        if start + weights.shape[1] >= self.q_hi:
            raise _Done


@torch.inference_mode()
def prompt_rows(lm: LoadedModel, prompt_ids: list[int], layer: int, q_lo: int, q_hi: int) -> np.ndarray:
    """(heads, q_hi - q_lo, T) float32: the exact attention rows of prompt positions q_lo..q_hi-1."""
    t = len(prompt_ids)
    if not 0 <= layer < lm.n_layers:
        raise ValueError(f"layer {layer} does not exist: the model has layers 0..{lm.n_layers - 1}")
    if not 0 <= q_lo < q_hi <= t or q_hi - q_lo > MAX_ROWS:
        raise ValueError(f"rows {q_lo}..{q_hi - 1} are not a window of at most {MAX_ROWS} rows of the {t}-token prompt")
    if not capture.supports(lm.model):
        raise ValueError(f"{lm.source.name}'s attention cannot be captured, so it cannot be recomputed")
    capture.install(lm.model)
    sink = _OneLayer(layer, q_lo, q_hi)
    sink.way = fidelity.way_of(lm)
    ids = torch.tensor([prompt_ids[:q_hi]], dtype=torch.long, device=lm.device)
    try:
        with capture.capturing(sink):
            lm.model(input_ids=ids, use_cache=False, logits_to_keep=1)
    except _Done:
        pass
    width = max(p.shape[-1] for p in sink.parts)  # chunks may stop at their own last key: pad to the widest
    rows = (
        torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[-1])) for p in sink.parts], dim=1).cpu().numpy()
    )  # (heads, q, q_hi): keys past q_hi are future positions
    return np.pad(rows, ((0, 0), (0, 0), (0, t - rows.shape[-1])))

"""Attention capture without `output_attentions`: a registered attention function that hands weights on.

The model computes its own attention with sdpa (fast, memory-light); this module recomputes the
weights the tool records, softmax(q·Kᵀ·scaling + mask) in float32, from the very query and key
tensors the layer used (rotary embeddings applied, the cache's keys included), one layer at a time:
- a decode step (one query) yields each layer's single row, (heads, keys), cheap at any length;
- a prefill yields its rows in query chunks, (heads, chunk, keys), so no layer's full T×T matrix
  and never every layer at once is held; a `Sink` decides what to keep of each chunk.

With attention_precision=eager a half-precision run takes the model's own eager function instead,
output and weights both (eager_weights), to match tools that read `output_attentions`.

The function is registered once under `IMPLEMENTATION` and a model is switched to it at load.
Without an active sink (capture off, another thread, another run) it is plain sdpa, so a model
shared by every session of the app pays nothing when nobody records. The sink is thread-local
because the app serves each session's run from its own thread over one shared model.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import torch

from . import lrp

IMPLEMENTATION = "explorer_capture"
CHUNK_BYTES = (
    16 * 1024 * 1024
)  # float32 scores of one prefill chunk, all heads: small enough to stay in cache (measured: 64 MB chunks took 1.5x longer at 2,000 tokens)

PRECISIONS = ("float32", "eager")  # how recorded weights are computed in a half-precision model (see eager_weights)
HALF = (torch.bfloat16, torch.float16)

_local = threading.local()


class Sink(Protocol):
    """Receives attention weights as they leave each layer (float32, batch 1, on that layer's device)."""

    def rows(self, layer: int, start: int, weights: torch.Tensor) -> None:
        """weights: (heads, q, keys) for queries at positions start..start+q-1."""


@contextmanager
def capturing(sink: Sink | None) -> Iterator[None]:
    """Route attention weights of forwards run inside this block (in this thread) to `sink`."""
    before = getattr(_local, "sink", None)
    _local.sink = sink
    try:
        yield
    finally:
        _local.sink = before


def _sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def capture_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The layer's output from sdpa, plus the weights for the active sink (query: (1, heads, q, d))."""
    if lrp.active():  # AttnLRP's uniform rule on attention's two products (explorer_core.lrp)
        query, key, value = lrp.divide_gradient(query, 4), lrp.divide_gradient(key, 4), lrp.divide_gradient(value, 2)
    sink = getattr(_local, "sink", None)
    if sink is not None and getattr(sink, "precision", PRECISIONS[0]) == "eager" and query.dtype in HALF:
        return _eager_forward(sink, module, query, key, value, attention_mask, scaling, kwargs), None
    out, _ = _sdpa()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if sink is not None:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        if query.shape[2] == 1 and attention_mask is None and kwargs.get("softcap") is None:
            sink.rows(int(module.layer_idx), 0, decode_row(query, key, scale))  # a cached step: the hot path
            return out, None
        pad_to = getattr(sink, "key_multiple", 1)
        for start, weights in attention_weights(query, key, attention_mask, scale, kwargs.get("softcap"), pad_to):
            sink.rows(int(module.layer_idx), start, weights)  # on the layer's device
    return out, None


def decode_row(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """(heads, 1, keys) float32 weights of one query that may see every key (a cached step, no mask).

    The same numbers as attention_weights, in three kernels: this runs once per layer per token.
    """
    _, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    q = (query[0, :, 0].float() * scaling).view(kv_heads, heads // kv_heads, dim)  # (kv_heads, group, d)
    scores = torch.bmm(q, key[0].float().transpose(1, 2))  # (kv_heads, group, keys)
    return torch.softmax(scores.view(heads, 1, -1), dim=-1)


def attention_weights(
    query: torch.Tensor,
    key: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
    key_multiple: int = 1,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (first query's offset, (heads, chunk, keys') float32 weights), chunk by chunk.

    query: (1, heads, q, d); key: (1, kv_heads, keys, d), kv_heads dividing heads (grouped-query
    attention maps query head h to key head h // group, as `repeat_kv` does). The query positions are
    the last q of the keys (a prefill or a cached step). mask: None (plain causal), a boolean
    (True = may attend) or an additive float mask, broadcastable to (1, heads, q, keys).

    A causal chunk cannot see past its own last query, so only keys up to there are computed (half
    the work of a prefill); keys' is that count rounded up to `key_multiple`, the extra keys weighing
    zero, so a caller can pool keys with a reshape instead of a copy. Weights past keys' are zero.

    Precision: scores and softmax are float32 whatever the weights' dtype, and the weights are not
    rounded back to it. That is what the layer's own computation does: the model runs sdpa, whose
    kernels accumulate q·Kᵀ and take the softmax in float32. Eager attention differs in bfloat16: it
    rounds the scores to bfloat16 before the softmax (in steps of 0.125 for scores between 16 and 32) and the weights
    after it. Measured on the default model in bfloat16 (tests/test_gpu_paths.py): these weights times V
    rebuild each layer's sdpa output to 0.0034 of its largest value, eager's weights only to 0.016, and
    rounding these to bfloat16 makes it worse (0.005); so eager's bfloat16 weights are not the default.
    A run asks for them with attention_precision=eager (see eager_weights).
    """
    _, heads, q_len, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    group = heads // kv_heads
    k = torch.nn.functional.pad(key[0].float(), (0, 0, 0, -keys % key_multiple))  # (kv_heads, keys padded, d)
    chunk = max(1, CHUNK_BYTES // (4 * heads * keys))
    past = keys - q_len
    for a in range(0, q_len, chunk):
        b = min(q_len, a + chunk)
        seen = past + b if mask is None else keys  # a causal chunk sees keys up to its last query
        width = -(-seen // key_multiple) * key_multiple
        q = (query[0, :, a:b].float() * scaling).reshape(kv_heads, group, b - a, dim)  # (kv_heads, group, c, d)
        scores = torch.matmul(q, k[:, None, :width].transpose(-1, -2)).reshape(heads, b - a, width)
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        _mask_(scores, mask, a, b, past, seen)
        yield a, torch.softmax(scores, dim=-1)  # (heads, c, width)


def _eager_forward(sink, module, query, key, value, mask, scaling, kwargs) -> torch.Tensor:
    """attention_precision=eager on a half-precision model: the layer's output and its weights both
    come from the model's own eager attention function, so the run is an eager run (its tokens and
    rows equal an eager forward's) and the rows are what `output_attentions=True` returns."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    pad_to, outs = getattr(sink, "key_multiple", 1), []
    for start, weights, out in eager_weights(module, query, key, value, mask, scale, pad_to, kwargs):
        sink.rows(int(module.layer_idx), start, weights)
        outs.append(out)
    return torch.cat(outs, dim=1)  # (1, q, heads, d), as the attention interface returns it


def eager_weights(module, query, key, value, mask, scaling: float, key_multiple: int, kwargs) -> Iterator:
    """Yield (first query's offset, (heads, chunk, keys') float32 weights, the chunk's output) as the
    model's own eager attention function computes them: its arithmetic and its rounding to the
    model's dtype (Llama rounds the float32 softmax to bfloat16, GPT-2 takes the softmax in bfloat16).

    Chunked over queries like attention_weights, so no layer's whole T×T is held; a layer without a
    mask (a causal prefill, a cached step) gets eager's additive causal mask.
    """
    eager = eager_function(module)
    _, heads, q_len, _ = query.shape
    keys = key.shape[2]
    width = -(-keys // key_multiple) * key_multiple
    chunk = max(1, CHUNK_BYTES // (4 * heads * keys))
    for a in range(0, q_len, chunk):
        b = min(q_len, a + chunk)
        m = _eager_mask(mask, a, b, keys - q_len, keys, query)
        out, w = eager(module, query[:, :, a:b], key, value, m, scaling=scaling, dropout=0.0, **kwargs)
        yield a, torch.nn.functional.pad(w[0].float(), (0, width - keys)), out  # (heads, c, width)


def _eager_mask(mask, a: int, b: int, past: int, keys: int, query: torch.Tensor) -> torch.Tensor:
    """Query rows a..b-1 of the layer's mask as eager takes it: additive, 4-d, in the model's dtype."""
    if mask is None:  # sdpa's causal flag: query i sees keys up to past + i
        rows = torch.arange(a, b, device=query.device)[:, None]
        mask = torch.arange(keys, device=query.device)[None, :] <= past + rows
    elif mask.shape[-2] > 1:
        mask = mask[..., a:b, :]
    if mask.dtype == torch.bool:
        mask = torch.where(mask, 0.0, torch.finfo(query.dtype).min)
    mask = mask.to(query.dtype)
    return mask.view((1,) * (4 - mask.dim()) + tuple(mask.shape))


def eager_function(module):
    """The eager attention function of the module's own modeling file (what output_attentions uses)."""
    function = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if function is None:
        raise ValueError(
            f"{type(module).__name__} has no eager_attention_forward in its modeling file, so "
            "attention_precision=eager cannot reproduce it: use attention_precision=float32"
        )
    return function


def _mask_(scores: torch.Tensor, mask: torch.Tensor | None, a: int, b: int, past: int, seen: int) -> None:
    """Mask query rows a..b-1 in place: padding keys, then the layer's mask (causal when it passed none)."""
    scores[..., seen:] = float("-inf")
    if mask is None:
        if b - a > 1:  # within the chunk's own keys, query i sees keys up to past+a+i
            block = scores[..., past + a : past + b]
            block.masked_fill_(torch.ones(b - a, b - a, dtype=torch.bool, device=scores.device).triu(1), float("-inf"))
        return
    m = mask[0] if mask.dim() == 4 else mask  # (heads or 1, q, keys)
    m = m[..., a:b, :] if m.shape[-2] > 1 else m
    view = scores[..., : m.shape[-1]]
    if m.dtype == torch.bool:
        view.masked_fill_(~m, float("-inf"))
    else:
        view.add_(m.float())


_registered = False


def register() -> None:
    """Register the capture function (and sdpa's mask builder for it) with transformers, once."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, capture_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
    _registered = True


def supports_eager(model) -> bool:
    """Whether every attention layer's modeling file has the function attention_precision=eager calls."""
    layers = [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]
    return bool(layers) and all(
        getattr(sys.modules.get(type(m).__module__), "eager_attention_forward", None) for m in layers
    )


def supports(model) -> bool:
    """Whether the model's attention layers dispatch through transformers' AttentionInterface."""
    return bool(getattr(model, "_supports_attention_backend", False))


def install(model) -> str | None:
    """Switch a model to the capture function; return the implementation it had (to restore later)."""
    register()
    before = getattr(model.config, "_attn_implementation", None)
    if before != IMPLEMENTATION:
        model.set_attn_implementation(IMPLEMENTATION)
    return before

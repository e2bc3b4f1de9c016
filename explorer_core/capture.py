"""Attention capture without `output_attentions`: a registered attention function that hands weights on.

The model's output always comes from its own attention implementation, the one it was loaded with
(`native`: sdpa for most models, eager for those that declare sdpa unsupported, such as attention
sinks or soft-capped scores), so recording never changes what the model computes. The weights the
tool records come, per layer call:
- from the native function itself when it returns them (eager): the model's own numbers, for free;
- otherwise from the modeling file's own `eager_attention_forward` run on the very query, key and
  value tensors the layer used (way "own"), in query chunks so no layer's T×T is held: it applies the
  model's masks, windows, sinks, soft-caps and scalings because it is the model's code;
- or from `attention_weights`, a fast float32 softmax of q·Kᵀ (way "fast"), only on a model where the
  fidelity check at load (explorer_core.fidelity) proved it equal to the model's own weights.

Keys arrive as the cache holds them: a sliding-window or chunked layer hands a decode step only its last
`window` keys, so rows are handed on with the absolute position of their first key (`rows(..., first_key)`).
A layer that calls the attention function more than once per forward (DiffLlama) is recorded once, its
first call, which is what it returns as its weights.

With attention_precision=eager a half-precision run takes the model's own eager function instead,
output and weights both (eager_weights), to match tools that read `output_attentions`.

The function is registered once per native implementation under `PREFIX + native`, together with that
implementation's own mask builder. Without an active sink (capture off, another thread, another run) it
is the native function, so a model shared by every session of the app pays nothing when nobody records.
The sink is thread-local because the app serves each session's run from its own thread over one model.
"""

from __future__ import annotations

import functools
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import torch

from . import lrp

PREFIX = "explorer_capture:"  # + the native implementation's name
CHUNK_BYTES = (
    16 * 1024 * 1024
)  # float32 scores of one prefill chunk, all heads: small enough to stay in cache (measured: 64 MB chunks took 1.5x longer at 2,000 tokens)

PRECISIONS = ("float32", "eager")  # how recorded weights are computed in a half-precision model (see eager_weights)
WAYS = ("own", "fast")  # where recorded weights come from when the native function returns none
HALF = (torch.bfloat16, torch.float16)

_local = threading.local()


class Sink(Protocol):
    """Receives attention weights as they leave each layer (float32, batch 1, on that layer's device)."""

    def rows(self, layer: int, start: int, weights: torch.Tensor, first_key: int = 0) -> None:
        """weights: (heads, q, keys) for queries at positions start..start+q-1 of the forward and keys
        at absolute positions first_key.. (a sliding layer's cache starts past 0)."""


@contextmanager
def capturing(sink: Sink | None) -> Iterator[None]:
    """Route attention weights of one forward run inside this block (in this thread) to `sink`."""
    before = getattr(_local, "sink", None), getattr(_local, "seen", None)
    _local.sink, _local.seen = sink, set()
    try:
        yield
    finally:
        _local.sink, _local.seen = before


def native_function(native: str, module):
    """The attention function the model runs as loaded: its own file's eager function, or a registered one."""
    return _native_function(native, type(module))


@functools.cache
def _native_function(native: str, module_class: type):  # resolved once: every layer calls it every token
    if native == "eager":
        return _eager_of(module_class)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[native]


def capture_attention_forward(
    native: str, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs
):
    """The layer's output from its native function, plus the weights for the active sink (query: (1, heads, q, d))."""
    if lrp.active():  # AttnLRP's uniform rule on attention's two products (explorer_core.lrp)
        query, key, value = lrp.divide_gradient(query, 4), lrp.divide_gradient(key, 4), lrp.divide_gradient(value, 2)
    function = native_function(native, module)
    sink, layer = getattr(_local, "sink", None), getattr(module, "layer_idx", None)
    if sink is None or layer is None or layer in _local.seen:  # a second call in one forward is not recorded
        return function(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    _local.seen.add(layer)
    layer = int(layer)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if getattr(sink, "precision", PRECISIONS[0]) == "eager" and query.dtype in HALF:
        return _eager_forward(sink, module, query, key, value, attention_mask, scale, kwargs), None
    out, weights = function(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    first_key = _first_key(sink, query, key)
    if isinstance(weights, torch.Tensor) and weights.dim() == 4:  # the native function's own weights (eager)
        _hand_on(sink, layer, weights[0].float(), first_key)
    elif getattr(sink, "way", "own") == "fast":
        if query.shape[2] == 1 and attention_mask is None and kwargs.get("softcap") is None:
            sink.rows(layer, 0, decode_row(query, key, scale), first_key)  # a cached step: the hot path
        else:
            pad_to = getattr(sink, "key_multiple", 1)
            for start, w in attention_weights(query, key, attention_mask, scale, kwargs.get("softcap"), pad_to):
                sink.rows(layer, start, w, first_key)
    else:
        pad_to = getattr(sink, "key_multiple", 1)
        for start, w, _ in eager_weights(module, query, key, value, attention_mask, scale, pad_to, kwargs):
            sink.rows(layer, start, w, first_key)
    return out, weights


def _first_key(sink, query: torch.Tensor, key: torch.Tensor) -> int:
    """Absolute position of the first key: the cache hands over the last keys of `positions` so far."""
    positions = getattr(sink, "positions", None)
    return 0 if positions is None else max(0, int(positions) - key.shape[2])


def _hand_on(sink, layer: int, weights: torch.Tensor, first_key: int) -> None:
    """Give a whole (heads, q, keys) block to the sink in query chunks, keys padded as it asks."""
    heads, q_len, keys = weights.shape
    pad_to = getattr(sink, "key_multiple", 1)
    padded = torch.nn.functional.pad(weights, (0, -keys % pad_to))
    chunk = max(1, CHUNK_BYTES // (4 * heads * max(keys, 1)))
    for a in range(0, q_len, chunk):
        sink.rows(layer, a, padded[:, a : a + chunk], first_key)


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
    pad_to, outs, first_key = getattr(sink, "key_multiple", 1), [], _first_key(sink, query, key)
    for start, weights, out in eager_weights(module, query, key, value, mask, scale, pad_to, kwargs):
        sink.rows(int(module.layer_idx), start, weights, first_key)
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
    return _eager_of(type(module))


def _eager_of(module_class: type):
    function = getattr(sys.modules.get(module_class.__module__), "eager_attention_forward", None)
    if function is None:
        raise ValueError(
            f"{module_class.__name__} has no eager_attention_forward in its modeling file, so "
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


_registered: set[str] = set()


def implementation(native: str) -> str:
    """Register the capture function over `native`, with `native`'s own mask builder; return its name."""
    name = PREFIX + native
    if name in _registered:
        return name
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(name, functools.partial(capture_attention_forward, native))
    if native in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[native])
    _registered.add(name)
    return name


def native_of(model) -> str:
    """The implementation the model computes with: what it was loaded with, under the capture function or not."""
    current = str(getattr(model.config, "_attn_implementation", None) or "eager")
    return current.removeprefix(PREFIX)


def installed(model) -> bool:
    return str(getattr(model.config, "_attn_implementation", "")).startswith(PREFIX)


def supports_eager(model) -> bool:
    """Whether every attention layer's modeling file has the function attention_precision=eager calls."""
    layers = [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]
    return bool(layers) and all(
        getattr(sys.modules.get(type(m).__module__), "eager_attention_forward", None) for m in layers
    )


def supports(model) -> bool:
    """Whether the model's attention layers dispatch through transformers' AttentionInterface (read from its
    code by transformers itself), so the capture function can sit between them and their implementation."""
    if installed(model):
        return True
    can_set = getattr(model, "_can_set_attn_implementation", None)
    return bool(getattr(model, "_supports_attention_backend", False)) and bool(can_set and can_set())


def install(model) -> str | None:
    """Put the capture function over the model's own implementation; return the implementation it had."""
    before = getattr(model.config, "_attn_implementation", None)
    if not installed(model):
        name = implementation(native_of(model))
        model.set_attn_implementation(name)
        if not installed(model):
            raise ValueError(f"{type(model).__name__} did not accept the capture function {name!r}")
    return before

"""Attention-aware LRP (AttnLRP: Achtibat et al., ICML 2024) in its gradient × input form.

One backward pass with the gradient changed at a few places makes gradient × input at the embeddings
a relevance that follows AttnLRP's rules:
- normalisation (RMSNorm, LayerNorm): identity rule, the per-token scale held constant;
- element-wise activations (SiLU, GELU): identity rule, relevance passes through unchanged;
- the gated MLP's product act(gate) · up: uniform rule, half to each factor;
- attention: uniform rule on its two products, the query's and key's gradient divided by 4 and the
  value's by 2; the softmax keeps its own gradient (AttnLRP's softmax rule in this form).
The forward values are unchanged (each change is x · stop_gradient(y / x) or a gradient divisor), so
the logit difference being explained is the model's own.

Written here rather than taken from LXT (the authors' package), because LXT patches the modeling
classes of transformers for the whole process (the app shares one model between sessions) and pulls in
bitsandbytes, zennit and open_clip. Here the rules live in hooks on one model's modules, are active
only inside `rules(model)` and only for forwards run in the thread that entered it (a recomputation of
such a forward carries them to whichever thread runs it), and are removed on the way out;
attention's divisors go through the capture function the model already runs (explorer_core.capture).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_local = threading.local()


def active() -> bool:
    """Whether this thread is inside `rules(...)` (read by capture's attention function)."""
    return getattr(_local, "depth", 0) > 0


@contextmanager
def carried(on: bool) -> Iterator[None]:
    """The rules on in this thread when they were on for the forward being recomputed.

    A checkpointed block recomputes its forward during the backward pass, in whatever thread runs it
    (on CUDA, autograd's own device thread): the rules must follow the forward they belong to, not the
    thread (explain.recomputed_blocks passes this as checkpoint's recomputation context).
    """
    if on:
        _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        if on:
            _local.depth -= 1


def recompute_contexts() -> tuple:
    """checkpoint's context_fn: nothing around the original forward, this forward's rules around its recomputation."""
    return contextlib.nullcontext(), carried(active())


class _DivideGradient(torch.autograd.Function):
    """Identity forward; the gradient divided by `factor` (the uniform rule over `factor` inputs)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad / ctx.factor, None


def divide_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    return _DivideGradient.apply(x, factor) if active() and x.requires_grad else x


def _through(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y's value with y/x held constant: relevance flows from y to x unchanged (identity rule)."""
    ratio = torch.where(x != 0, y / torch.where(x != 0, x, 1), 0)
    return x * ratio.detach()


def _norm_hook(module, args, output):
    if not active():
        return None
    x = args[0]
    if isinstance(module, torch.nn.LayerNorm):  # y = w (x - mean) / std + b: std held constant
        centred = x - x.mean(-1, keepdim=True)
        bias = module.bias if module.bias is not None else 0
        return _through(centred, output - bias) + bias
    return _through(x, output)  # RMSNorm: y = w x / rms(x), the rms held constant


def _activation_hook(module, args, output):
    return _through(args[0], output) if active() else None


def _halve_input(module, args):
    return (divide_gradient(args[0], 2), *args[1:]) if active() else None


def _targets(model) -> Iterator[tuple[str, torch.nn.Module]]:
    """(kind, module) for each module a rule applies to."""
    for module in model.modules():
        name = type(module).__name__
        if isinstance(module, torch.nn.LayerNorm) or name.endswith("RMSNorm"):
            yield "norm", module
        elif hasattr(module, "gate_proj") and hasattr(module, "up_proj") and hasattr(module, "down_proj"):
            yield "gated", module.down_proj  # its input is act(gate(x)) * up(x)
            yield "activation", getattr(module, "act_fn", None) or module.act
        elif hasattr(module, "c_fc") and hasattr(module, "act"):  # GPT-2's MLP
            yield "activation", module.act


@contextmanager
def rules(model) -> Iterator[None]:
    """AttnLRP's rules on `model` for this thread, while the block runs (forward values unchanged).

    The attention divisors live in explorer_core.capture's attention function: the model must run it
    (capture.install(model) switches it).
    """
    hooks, seen = [], set()
    for kind, module in _targets(model):
        if module is None or id(module) in seen:
            continue
        seen.add(id(module))
        if kind == "gated":
            hooks.append(module.register_forward_pre_hook(_halve_input))
        else:
            hooks.append(module.register_forward_hook(_norm_hook if kind == "norm" else _activation_hook))
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1
        for hook in hooks:
            hook.remove()

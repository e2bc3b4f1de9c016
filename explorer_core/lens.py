"""Logit lens: read each layer's hidden state through the model's final norm and the model's own head.

The head is the model's own code, not a copy of it: `head_logits` runs the causal-LM's forward with its
inner model short-circuited to return the given hidden states, so whatever the model does after its
output layer (Gemma 2's final soft-cap, Cohere's logit_scale, Granite's logits_scaling) is applied.
The last entry of `hidden_states` already has the final norm applied (llama, GPT-2), so only the
earlier layers go through it; the last layer's lens is then exactly the model's own distribution,
which the fidelity check at load proves per model (explorer_core.fidelity).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch

_local = threading.local()
# where common architectures keep their final norm, under the model's inner (base) model
_FINAL_NORMS = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "norm_f", "final_norm", "layer_norm")


def inner_model(model) -> torch.nn.Module | None:
    """The model under the head: its base model, or `.model` where base_model_prefix names no attribute
    (Llama 4's text model); None when there is none."""
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        base = getattr(model, "model", None)
    return base if isinstance(base, torch.nn.Module) and base is not model else None


def final_norm(model) -> torch.nn.Module:
    inner = inner_model(model)
    for node in (inner, getattr(inner, "decoder", None)):
        for attr in _FINAL_NORMS:
            norm = getattr(node, attr, None) if node is not None else None
            if isinstance(norm, torch.nn.Module):
                return norm
    raise ValueError(f"logit lens does not know where {type(model).__name__} keeps its final norm; turn logit_lens off")


def install(model) -> None:
    """Let the causal-LM's own forward run on given hidden states (a pass-through until `head_logits` asks)."""
    base = inner_model(model)
    if base is None:
        raise ValueError(
            f"{type(model).__name__} has no inner model under its head: the logit lens cannot use its head"
        )
    if base.__dict__.get("_explorer_lens"):
        return
    original = base.forward

    def forward(*args, **kwargs):
        hidden = getattr(_local, "hidden", None)
        if hidden is None:  # every ordinary call: the inner model as it was
            return original(*args, **kwargs)
        return _HiddenOnly(hidden)

    base.forward = forward
    base._explorer_lens = True


class _HiddenOnly:
    """The inner model's output as the head reads it: the given hidden states, every other field None
    (caches, router logits, cross-attentions: the head's code only passes them on)."""

    def __init__(self, hidden: torch.Tensor) -> None:
        self.last_hidden_state = hidden

    def __getattr__(self, name: str):  # called only for fields not set above
        if name.startswith("__"):
            raise AttributeError(name)
        return None

    def __getitem__(self, key):
        if key in (0, "last_hidden_state"):
            return self.last_hidden_state
        raise IndexError(key)

    def to_tuple(self) -> tuple:
        return (self.last_hidden_state,)


@contextmanager
def _given(hidden: torch.Tensor):
    before = getattr(_local, "hidden", None)
    _local.hidden = hidden
    try:
        yield
    finally:
        _local.hidden = before


def head_logits(model, normed: torch.Tensor) -> torch.Tensor:
    """normed: (n, d) final-normed hidden states -> (n, vocab) float32 logits from the model's own head."""
    install(model)
    ids = torch.zeros((1, normed.shape[0]), dtype=torch.long, device=normed.device)
    with _given(normed[None]):
        out = model(input_ids=ids, use_cache=False, logits_to_keep=0)
    return out.logits[0].float()


def layer_logprobs(model, hidden: torch.Tensor) -> torch.Tensor:
    """hidden: (layers, d) at one position, last layer already normed -> (layers, vocab) log-probs."""
    normed = torch.cat([final_norm(model)(hidden[:-1]), hidden[-1:]], dim=0)
    return torch.log_softmax(head_logits(model, normed), dim=-1)

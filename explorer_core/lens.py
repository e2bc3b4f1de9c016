"""Logit lens: read each layer's hidden state through the model's final norm and output head.

The last entry of `hidden_states` already has the final norm applied (llama, GPT-2), so only the
earlier layers go through it; the last layer's lens is then exactly the model's own distribution.
"""

from __future__ import annotations

import torch

# where common architectures keep their final norm
_FINAL_NORMS = (
    ("model", "norm"),
    ("transformer", "ln_f"),
    ("gpt_neox", "final_layer_norm"),
    ("model", "final_layernorm"),
    ("model", "decoder", "final_layer_norm"),
)


def final_norm(model) -> torch.nn.Module:
    for path in _FINAL_NORMS:
        node = model
        for attr in path:
            node = getattr(node, attr, None)
            if node is None:
                break
        if isinstance(node, torch.nn.Module):
            return node
    raise ValueError(f"logit lens does not know where {type(model).__name__} keeps its final norm; turn logit_lens off")


def layer_logprobs(model, hidden: torch.Tensor) -> torch.Tensor:
    """hidden: (layers, d) at one position, last layer already normed -> (layers, vocab) log-probs."""
    normed = torch.cat([final_norm(model)(hidden[:-1]), hidden[-1:]], dim=0)
    logits = model.get_output_embeddings()(normed).float()
    return torch.log_softmax(logits, dim=-1)

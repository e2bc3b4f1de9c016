"""A model's shape for planning (parameters, layers, heads), read from a config or a model object, no weights."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    """What planning needs to know about a model."""

    parameters: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int


def shape_of(hf_config) -> ModelShape:
    """The shape of a transformers config's causal LM, its parameters counted on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        shell = AutoModelForCausalLM.from_config(hf_config)
    return shape_of_model(shell)


def layers_of(cfg) -> int:
    return int(getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None) or 0)


def heads_of(cfg) -> int:
    """Attention heads per layer; 0 for an attention-free model (Mamba, RWKV)."""
    return int(getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None) or 0)


def shape_of_model(model) -> ModelShape:
    """The shape of a model object (loaded, offloaded or on the meta device: only sizes are read)."""
    cfg = model.config
    heads = heads_of(cfg)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or (cfg.hidden_size // heads if heads else 0))
    count = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    return ModelShape(count, layers_of(cfg), heads, kv_heads, head_dim)

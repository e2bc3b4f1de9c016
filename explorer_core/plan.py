"""Memory planning before a run: the weights' size in the chosen dtype, the KV cache, and the attention
the run will record, against the host's limits, from the model's config alone (no weights read).

The parameter count comes from building the model on the meta device, as models.check_size does, so
it is exact for any architecture transformers knows (tied embeddings counted once).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .config import GenerationConfig
from .limits import AttentionCost, Limits, attention_cost
from .shapes import ModelShape, shape_of, shape_of_model  # noqa: F401 - planning's public names

ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class MemoryPlan:
    """One run's memory, in MB (weights as check_size counts them, 10^6 bytes; attention in MiB as limits does)."""

    dtype: str
    weights_mb: float
    kv_cache_mb: float | None  # None while the prompt length is unknown
    attention: AttentionCost | None  # None when capture is off or the prompt length is unknown
    refusals: tuple[str, ...]  # each names the limit it breaks and its environment variable

    def check(self) -> None:
        """Raise the first refusal as a ValueError."""
        if self.refusals:
            raise ValueError(self.refusals[0])


@functools.lru_cache(maxsize=16)
def shape_for_name(name: str) -> ModelShape:
    """The shape of a model by name, from its config file only; raises models.ModelLoadError when unreadable."""
    from transformers import AutoConfig

    from . import models

    source = models.resolve(name)
    location = source.location
    if source.embedded:  # the converted copy carries a plain config.json; the GGUF would need parsing
        location = str(models.converted_dir())
    try:
        return shape_of(AutoConfig.from_pretrained(location, trust_remote_code=False))
    except Exception as exc:  # noqa: BLE001 - reported as one sentence, as models.load does
        raise models.ModelLoadError(models._explain(source, exc)) from exc


def megabytes(mb: float) -> str:
    """MB for people: whole numbers, or two figures below 10 (a tiny model's weights are a fraction of one)."""
    return f"{mb:,.0f}" if mb >= 10 else f"{mb:.2g}"


def weights_dtype(config: GenerationConfig) -> str:
    """The dtype a load with this config gives, without touching a GPU ("auto": bfloat16 on CUDA)."""
    if config.dtype != "auto":
        return config.dtype
    if config.device == "cuda":
        return "bfloat16"
    if config.device == "auto":
        import torch

        return "bfloat16" if torch.cuda.is_available() else "float32"
    return "float32"


def plan(shape: ModelShape, config: GenerationConfig, limits: Limits, prompt_tokens: int | None = None) -> MemoryPlan:
    """Weights, KV cache and recorded attention for a run of `config`; refusals name the limit broken."""
    dtype = weights_dtype(config)
    weights_mb = shape.parameters * ITEMSIZE[dtype] / 1e6
    refusals = []
    if weights_mb > limits.max_model_mb:
        refusals.append(
            f"model {config.model!r} needs about {megabytes(weights_mb)} MB of weights in {dtype}, over this host's "
            f"limit of {limits.max_model_mb:,} MB (EXPLORER_MAX_MODEL_MB): pick a smaller model or dtype"
        )
    kv_mb = attention = None
    if prompt_tokens is not None:
        positions = prompt_tokens + config.max_new_tokens
        kv_mb = 2 * shape.layers * shape.kv_heads * shape.head_dim * positions * ITEMSIZE[dtype] / 1e6  # keys, values
        if config.capture_attention and shape.heads > 0:  # an attention-free model records nothing
            attention = attention_cost(
                prompt_tokens, config.max_new_tokens, shape.layers, shape.heads, limits.prompt_attention_bytes()
            )
            try:
                limits.check_run(config, prompt_tokens, shape.layers, shape.heads)
            except ValueError as exc:  # the same check and message a run makes
                refusals.append(str(exc))
    return MemoryPlan(dtype, weights_mb, kv_mb, attention, tuple(refusals))

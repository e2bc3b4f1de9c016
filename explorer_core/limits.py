"""Caps for what one run may cost, with defaults fit for a public host; environment variables override.

Local use gets generous limits. `EXPLORER_HOSTED=1` (set it on a public host) tightens them and turns on
the model allowlist: hub ids only (no local paths), from `EXPLORER_ALLOWED_MODELS` or the presets.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .config import DEFAULT_MODEL, GenerationConfig

HOSTED_MODELS = (DEFAULT_MODEL, "HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2")


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not a whole number") from None


@dataclass(frozen=True)
class Limits:
    """Upper bounds checked before a run starts; every refusal names the limit and how to change it."""

    hosted: bool = False
    max_prompt_tokens: int = 4096
    max_new_tokens: int = 2048
    max_top_n: int = 100
    attention_budget_mb: int = 4096  # attention one run records (the companion on disk, float16)
    prompt_attention_mb: int = 40  # of which the prompt's own pooled T×T attention
    max_model_mb: int = 8192  # weights in the chosen dtype
    max_ig_passes: int = 1024  # integrated gradients' gradient passes in one explanation
    max_explain_s: int = 3600  # wall time of one explanation, checked between its passes
    allowed_models: tuple[str, ...] = field(default=())

    @classmethod
    def from_env(cls) -> Limits:
        hosted = os.environ.get("EXPLORER_HOSTED", "") in ("1", "true", "yes")
        base = (
            cls(
                hosted=True,
                max_prompt_tokens=1024,
                max_new_tokens=512,
                max_top_n=20,
                attention_budget_mb=600,
                max_model_mb=1200,
                max_ig_passes=256,  # the default: about 11 min at 500 prompt tokens on 2 cores
                max_explain_s=180,  # one visitor holds the only model slot for at most 3 minutes
                allowed_models=HOSTED_MODELS,
            )
            if hosted
            else cls()
        )
        allowed = os.environ.get("EXPLORER_ALLOWED_MODELS")
        return cls(
            hosted=hosted,
            max_prompt_tokens=_env_int("EXPLORER_MAX_PROMPT_TOKENS", base.max_prompt_tokens),
            max_new_tokens=_env_int("EXPLORER_MAX_NEW_TOKENS", base.max_new_tokens),
            max_top_n=_env_int("EXPLORER_MAX_TOP_N", base.max_top_n),
            attention_budget_mb=_env_int("EXPLORER_ATTENTION_BUDGET_MB", base.attention_budget_mb),
            prompt_attention_mb=_env_int("EXPLORER_PROMPT_ATTENTION_MB", base.prompt_attention_mb),
            max_model_mb=_env_int("EXPLORER_MAX_MODEL_MB", base.max_model_mb),
            max_ig_passes=_env_int("EXPLORER_MAX_IG_PASSES", base.max_ig_passes),
            max_explain_s=_env_int("EXPLORER_MAX_EXPLAIN_S", base.max_explain_s),
            allowed_models=tuple(m.strip() for m in allowed.split(",") if m.strip())
            if allowed
            else base.allowed_models,
        )

    def check_config(self, config: GenerationConfig) -> None:
        """Checks that need no model: lengths, candidates, the allowlist."""
        if config.max_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"max_new_tokens={config.max_new_tokens} is over this host's limit of "
                f"{self.max_new_tokens} (EXPLORER_MAX_NEW_TOKENS)"
            )
        if config.top_n > self.max_top_n:
            raise ValueError(f"top_n={config.top_n} is over this host's limit of {self.max_top_n} (EXPLORER_MAX_TOP_N)")
        self.check_model_name(config.model)

    def check_model_name(self, name: str) -> None:
        if self.allowed_models and name.strip() not in self.allowed_models:
            raise ValueError(
                f"model {name!r} is not allowed on this host; choose one of: "
                f"{', '.join(self.allowed_models)} (EXPLORER_ALLOWED_MODELS)"
            )

    def check_run(self, config: GenerationConfig, prompt_tokens: int, layers: int, heads: int) -> None:
        """Checks once the prompt is tokenized and the model's shape is known."""
        if prompt_tokens > self.max_prompt_tokens:
            raise ValueError(
                f"the prompt is {prompt_tokens} tokens, over the limit of {self.max_prompt_tokens} "
                "(EXPLORER_MAX_PROMPT_TOKENS): shorten it"
            )
        if config.capture_attention:
            cost = attention_cost(prompt_tokens, config.max_new_tokens, layers, heads, self.prompt_attention_bytes())
            if cost.disk_mb > self.attention_budget_mb:
                raise ValueError(
                    f"recording attention for this run writes up to {cost.disk_mb:,.0f} MB, over the budget of "
                    f"{self.attention_budget_mb:,} MB (EXPLORER_ATTENTION_BUDGET_MB): lower max_new_tokens, "
                    "shorten the prompt or turn attention capture off"
                )

    def check_replay(self, trace) -> None:
        """A replay re-runs the model over the trace's prompt and steps: the same caps as generating them."""
        t, n = trace.prompt_len, len(trace.steps)
        if t > self.max_prompt_tokens or n > self.max_new_tokens:
            raise ValueError(
                f"replaying this trace runs {t} prompt tokens and {n} steps, over this host's limits of "
                f"{self.max_prompt_tokens} and {self.max_new_tokens} (EXPLORER_MAX_PROMPT_TOKENS, EXPLORER_MAX_NEW_TOKENS)"
            )

    def check_explain(self, ig_passes: int) -> None:
        """Integrated gradients costs about one backward per pass: the host caps the passes it may ask for."""
        if ig_passes > self.max_ig_passes:
            raise ValueError(
                f"{ig_passes} integrated-gradients passes are over this host's limit of {self.max_ig_passes} "
                f"(EXPLORER_MAX_IG_PASSES): ask for at most {self.max_ig_passes}"
            )

    def prompt_attention_bytes(self) -> int:
        return self.prompt_attention_mb * 2**20


@dataclass(frozen=True)
class AttentionCost:
    disk_mb: float  # the companion at max_new_tokens steps
    memory_mb: float  # what recording adds to a run's memory (the KV cache is planned apart, in plan.py)
    prompt_cells: int  # cells per axis of the prompt's pooled attention (= prompt tokens when exact)


def attention_cost(
    prompt_tokens: int, new_tokens: int, layers: int, heads: int, prompt_budget_bytes: int = 40 * 2**20
) -> AttentionCost:
    """What recording a run's attention will take, computed from its shape before it starts.

    Memory: the float32 cell sums of the prompt (held through the prefill), the pending row and its host
    copy, and four prefill chunks of float32 scores. A chunk holds the scores of as many queries as fit
    capture.CHUNK_BYTES (a short prompt's all fit in one smaller chunk); four of them cover the scores,
    their softmax and the pages the allocator keeps between chunks: measured on the default model at
    247 to 1,877 prompt tokens (bench/attnmem.py, RELIABILITY.md), recording added 0.94 to 1.04 times this.
    """
    from .attnstore import Shape, file_bytes, prompt_layout
    from .capture import CHUNK_BYTES

    t, n = prompt_tokens, new_tokens
    cells = len(prompt_layout(prompt_budget_bytes, layers, heads, t)[1]) - 1
    disk = file_bytes(Shape(layers, heads, t, cells), n)
    queries = max(1, min(t, CHUNK_BYTES // (4 * heads * t)))  # per chunk, as capture.attention_weights cuts them
    memory = 4 * layers * heads * (cells * cells + 2 * (t + n)) + 4 * (4 * heads * queries * t)
    return AttentionCost(disk / 2**20, memory / 2**20, cells)

"""The one generation config shared by the CLI and the app: a frozen, validated, inert dataclass."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
DEVICE_MAPS = ("none", "auto")
ATTENTION_PRECISIONS = ("float32", "eager")


def _f(default: Any, help: str, lo: float | None = None, hi: float | None = None, **extra: Any):
    """A dataclass field carrying its help text and valid range (read by argparse and the sidebar)."""
    return field(default=default, metadata={"help": help, "min": lo, "max": hi, **extra})


@dataclass(frozen=True)
class GenerationConfig:
    """Everything that shapes one generation run. Validation happens on construction."""

    prompt: str = _f("Explain why the sky is blue in one short paragraph.", "Prompt text.", max_chars=150_000)
    model: str = _f(DEFAULT_MODEL, "Model: the embedded default, a hub id, or a local folder.")
    max_new_tokens: int = _f(60, "Most new tokens to generate.", 1, 2048)
    min_new_tokens: int = _f(0, "EOS is masked and clean stop waits until this many tokens are out.", 0, 2048)
    temperature: float = _f(0.8, "Softmax temperature; 0 means greedy (argmax).", 0.0, 5.0)
    top_p: float = _f(0.95, "Nucleus sampling: keep the smallest set with this much mass; 1 disables.", 0.01, 1.0)
    top_k: int = _f(50, "Keep only the k most likely tokens; 0 disables.", 0, 100_000)
    repetition_penalty: float = _f(1.1, "Divide positive logits of seen tokens by this (1 disables).", 0.1, 10.0)
    no_repeat_ngram_size: int = _f(0, "Forbid repeating any n-gram of this size (0 disables).", 0, 20)
    block_eos_steps: int = _f(0, "Mask EOS for the first N new tokens.", 0, 2048)
    block_ws_steps: int = _f(0, "Mask whitespace-only tokens for the first N new tokens.", 0, 2048)
    attn_every: int = _f(10, "Store a head-averaged last-layer attention snapshot every N steps (0: none).", 0, 2048)
    seed: int = _f(42, "Seed of this run's own random generator.", 0, 2**32 - 1)
    stop_on: str = _f("", "Stop once the generated text contains this text (empty: off).", max_chars=1000)
    clean_stop: bool = _f(True, "After min_new_tokens, stop at the end of a sentence.")
    chat: bool = _f(True, "Wrap the prompt in the tokenizer's chat template (when it has one).")
    top_n: int = _f(10, "Candidates to log per step, for both distributions.", 1, 100)
    capture_attention: bool = _f(True, "Record every layer's and head's attention row at every step.")
    attention_precision: str = _f(
        "float32",
        "How recorded attention is computed for a bfloat16/float16 model: float32 (the exact softmax of "
        "each layer's own q and K, as sdpa computes it) or eager (transformers' eager attention, rounded "
        "to the model's dtype, as output_attentions returns it). The same numbers for float32 models.",
        choices=ATTENTION_PRECISIONS,
    )
    logit_lens: bool = _f(False, "Record each layer's top token (logit lens); each step takes 1.3-1.5x as long.")
    dtype: str = _f("auto", "Weights dtype: auto (float32 on CPU, bfloat16 on CUDA) or a name.", choices=DTYPES)
    device: str = _f("auto", "Device: auto (CUDA when present), cpu or cuda.", choices=DEVICES)
    device_map: str = _f(
        "none",
        "Layer placement: none (the whole model on `device`) or auto (accelerate spreads the layers over "
        "the visible GPUs, then CPU memory, then disk, for models bigger than one GPU).",
        choices=DEVICE_MAPS,
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check_field(f, getattr(self, f.name))
        if not self.model.strip():
            raise ValueError("model is empty: give the embedded default's name, a hub id or a local folder")
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens={self.min_new_tokens} exceeds max_new_tokens={self.max_new_tokens}: "
                "lower min_new_tokens or raise max_new_tokens"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationConfig:
        """Build from a dict, ignoring unknown keys (traces from other versions may carry extra ones)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def replace(self, **changes: Any) -> GenerationConfig:
        return dataclasses.replace(self, **changes)


def field_specs() -> list[dataclasses.Field]:
    """The config's fields in order, with their metadata (help, min, max, choices)."""
    return list(dataclasses.fields(GenerationConfig))


def check_field(f: dataclasses.Field, value: Any) -> None:
    """Raise a ValueError naming the field, the bad value and the valid range."""
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{f.name}={value!r} is not true or false")
        return
    if kind == "str":
        if not isinstance(value, str):
            raise ValueError(f"{f.name}={value!r} must be text")
        choices, most = f.metadata.get("choices"), f.metadata.get("max_chars")
        if most is not None and len(value) > most:
            raise ValueError(f"{f.name} is {len(value):,} characters, over the limit of {most:,}: shorten it")
        if choices and value not in choices:
            raise ValueError(f"{f.name}={value!r} is not one of {', '.join(choices)}")
        return
    if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{f.name}={value!r} must be a whole number")
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{f.name}={value!r} must be a finite number")
    lo, hi = f.metadata.get("min"), f.metadata.get("max")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{f.name}={value!r} is out of range: use a value from {lo} to {hi}")

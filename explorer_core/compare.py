"""Compare two runs on the same tokens: teacher-forced scoring and per-step KL / JS divergence.

Two models are compared on their raw distributions. One model with two settings has identical raw
distributions (only the rules differ), so its runs are compared after processing.
"""

from __future__ import annotations

import math

import pandas as pd
import torch

from .config import GenerationConfig
from .models import LoadedModel
from .processors import apply_chain, build_chain
from .stepper import eos_ids
from .tokens import vocab_for
from .trace import Trace

LN2 = math.log(2.0)
NOISE_BITS = 1e-9


def same_tokenizer(a: LoadedModel, b: LoadedModel) -> bool:
    """True when both tokenizers map the same text to the same ids (same vocabulary and specials)."""
    ta, tb = a.tokenizer, b.tokenizer
    return ta is tb or (len(ta) == len(tb) and ta.get_vocab() == tb.get_vocab())


@torch.inference_mode()
def next_token_logits(lm: LoadedModel, ids: list[int], prompt_len: int) -> torch.Tensor:
    """Teacher forcing: raw logits (steps, vocab) for each generated position of `ids`."""
    lm.check_fits(len(ids), "scoring run A's tokens")
    x = torch.tensor([ids], dtype=torch.long, device=lm.device)
    return lm.model(input_ids=x).logits[0, prompt_len - 1 : len(ids) - 1].float()


@torch.inference_mode()
def next_token_logprobs(lm: LoadedModel, ids: list[int], prompt_len: int) -> torch.Tensor:
    """Teacher forcing: one uncached forward over `ids`; log-probs for each generated position.

    Returns (steps, vocab): row s is the distribution that chose ids[prompt_len + s].
    """
    return torch.log_softmax(next_token_logits(lm, ids, prompt_len), dim=-1)


def divergence_frame(trace_a: Trace, lm_a: LoadedModel, lm_b: LoadedModel) -> tuple[pd.DataFrame, int | None]:
    """Per-step KL(A‖B) and JS(A,B) in bits on A's tokens, and the first step whose greedy choices differ."""
    ids = trace_a.prompt_ids + [s.token_id for s in trace_a.steps]
    t = trace_a.prompt_len
    lp_a = next_token_logprobs(lm_a, ids, t)  # (steps, vocab)
    lp_b = next_token_logprobs(lm_b, ids, t)
    vocab = min(lp_a.shape[-1], lp_b.shape[-1])  # heads may be padded past the tokenizer's size
    lp_a, lp_b = torch.log_softmax(lp_a[:, :vocab], -1), torch.log_softmax(lp_b[:, :vocab], -1)
    return _frame(trace_a, lp_a, lp_b, with_kl=True)


def _frame(trace_a: Trace, lp_a: torch.Tensor, lp_b: torch.Tensor, with_kl: bool) -> tuple[pd.DataFrame, int | None]:
    """KL(A‖B) (when asked) and JS(A,B) in bits per step, and the first step whose argmax differs.

    In float64: float32 rounding alone leaves about 1e-8 bits between identical distributions."""
    lp_a, lp_b = lp_a.double(), lp_b.double()
    p_a, p_b = lp_a.exp(), lp_b.exp()
    lp_m = torch.log(0.5 * (p_a + p_b))
    # 0 · log 0 counts as 0: tokens a rule removed have p = 0 and log p = -inf
    js = 0.5 * (_xlogy_diff(p_a, lp_a, lp_m) + _xlogy_diff(p_b, lp_b, lp_m)) / LN2
    differ = (lp_a.argmax(-1) != lp_b.argmax(-1)).nonzero()
    first = int(differ[0, 0]) if len(differ) else None
    labels = [s.label for s in trace_a.steps]
    measures = {"JS(A,B)": js}
    if with_kl:
        measures = {"KL(A‖B)": _xlogy_diff(p_a, lp_a, lp_b) / LN2} | measures
    frame = pd.concat(
        [
            pd.DataFrame({"step": range(len(labels)), "label": labels, "measure": name, "value": _floor(v)})
            for name, v in measures.items()
        ],
        ignore_index=True,
    )
    return frame, first


def _floor(v: torch.Tensor) -> list[float]:
    """Values under 1e-9 bits are rounding, not signal (float64 leaves about 1e-16 between equal inputs)."""
    return torch.where(v > NOISE_BITS, v, torch.zeros_like(v)).tolist()


def _xlogy_diff(p: torch.Tensor, lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """Sum over the vocabulary of p · (log p - log q), with 0 where p is 0."""
    return torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum(-1)


@torch.inference_mode()
def processed_divergence_frame(
    trace_a: Trace, lm: LoadedModel, config_a: GenerationConfig, config_b: GenerationConfig
) -> tuple[pd.DataFrame, int | None]:
    """One model, two settings: JS(A,B) in bits between the distributions each run's rules produce
    from the same raw scores on A's tokens, and the first step whose most likely processed token differs.
    (KL is left out: after top-k or top-p one side can give 0 to a token the other keeps.)"""
    ids = trace_a.prompt_ids + [s.token_id for s in trace_a.steps]
    t = trace_a.prompt_len
    logits = next_token_logits(lm, ids, t)  # (steps, vocab)
    x = torch.tensor([ids], dtype=torch.long, device=lm.device)
    eos = eos_ids(lm)
    lps = []
    for cfg in (config_a, config_b):
        ws = vocab_for(lm.tokenizer).whitespace_ids() if cfg.block_ws_steps > 0 else []
        chain = build_chain(cfg, t, eos, ws, device=lm.device)
        rows = [apply_chain(chain, x[:, : t + s], logits[s : s + 1]) for s in range(len(trace_a.steps))]
        lps.append(torch.log_softmax(torch.cat(rows), dim=-1))
    return _frame(trace_a, lps[0], lps[1], with_kl=False)


COMPARED_SETTINGS = ("model", "temperature", "top_p")  # what the Compare page lets run B change


def settings_changed(config_a: GenerationConfig, config_b: GenerationConfig) -> list[str]:
    """The settings run B changed, as "temperature 0.8 → 1.2" lines (empty when B repeats A)."""
    return [
        f"{name.replace('_', '-')} {getattr(config_a, name)} → {getattr(config_b, name)}"
        for name in COMPARED_SETTINGS
        if getattr(config_a, name) != getattr(config_b, name)
    ]


def first_token_difference(trace_a: Trace, trace_b: Trace) -> int | None:
    """The first step where the two runs chose different tokens (or one stopped), None when they match."""
    for a, b in zip(trace_a.steps, trace_b.steps):
        if a.token_id != b.token_id:
            return a.step
    if len(trace_a.steps) != len(trace_b.steps):
        return min(len(trace_a.steps), len(trace_b.steps))
    return None


def agreement(
    trace_a: Trace, trace_b: Trace, config_a: GenerationConfig, config_b: GenerationConfig, first: int | None, kind: str
) -> list[str]:
    """What the comparison establishes, in sentences that say what was compared, so that an agreement
    that holds by construction (greedy runs, or rules that never move the top token) is not sold as a finding."""
    changed = settings_changed(config_a, config_b)
    lines = [f"Same prompt and seed ({config_a.seed}); run B changed: {', '.join(changed) or 'nothing'}."]
    if not changed:
        return lines + ["Run B repeats run A exactly, so the two runs are the same by construction."]
    if kind == "raw":
        verdict = "agree at every step" if first is None else f"first differ at step {first}"
        lines.append(f"Model A's and model B's most likely next tokens, scored on run A's tokens, {verdict}.")
    elif config_a.greedy and config_b.greedy:
        return lines + ["Both runs are greedy: each takes the model's most likely token, so they agree trivially."]
    elif first is None:
        lines.append(
            "The most likely token after each run's rules is the same at every step, as it must be: "
            "temperature and top-p never change which token ranks first."
        )
    else:
        lines.append(f"The most likely token after each run's rules first differs at step {first}.")
    return lines + [_sampled(trace_a, trace_b)]


def _sampled(trace_a: Trace, trace_b: Trace) -> str:
    at = first_token_difference(trace_a, trace_b)
    if at is None:
        return f"The tokens the two runs chose are the same at every one of their {len(trace_a.steps)} steps."
    if at >= min(len(trace_a.steps), len(trace_b.steps)):
        return f"The tokens the two runs chose match until step {at}, where one run stops."
    a, b = trace_a.steps[at], trace_b.steps[at]
    return f"The tokens the two runs chose first differ at step {at}: {a.label!r} in A, {b.label!r} in B."

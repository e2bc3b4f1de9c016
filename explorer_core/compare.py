"""Compare two models on the same tokens: teacher-forced scoring and per-step KL / JS divergence."""

from __future__ import annotations

import math

import pandas as pd
import torch

from .models import LoadedModel
from .trace import Trace

LN2 = math.log(2.0)


def same_tokenizer(a: LoadedModel, b: LoadedModel) -> bool:
    """True when both tokenizers map the same text to the same ids (same vocabulary and specials)."""
    ta, tb = a.tokenizer, b.tokenizer
    return ta is tb or (len(ta) == len(tb) and ta.get_vocab() == tb.get_vocab())


@torch.inference_mode()
def next_token_logprobs(lm: LoadedModel, ids: list[int], prompt_len: int) -> torch.Tensor:
    """Teacher forcing: one uncached forward over `ids`; log-probs for each generated position.

    Returns (steps, vocab): row s is the distribution that chose ids[prompt_len + s].
    """
    lm.check_fits(len(ids), "scoring run A's tokens")
    x = torch.tensor([ids], dtype=torch.long, device=lm.device)
    logits = lm.model(input_ids=x).logits[0, prompt_len - 1 : len(ids) - 1].float()
    return torch.log_softmax(logits, dim=-1)


def divergence_frame(trace_a: Trace, lm_a: LoadedModel, lm_b: LoadedModel) -> tuple[pd.DataFrame, int | None]:
    """Per-step KL(A‖B) and JS(A,B) in bits on A's tokens, and the first step whose greedy choices differ."""
    ids = trace_a.prompt_ids + [s.token_id for s in trace_a.steps]
    t = trace_a.prompt_len
    lp_a = next_token_logprobs(lm_a, ids, t)  # (steps, vocab)
    lp_b = next_token_logprobs(lm_b, ids, t)
    vocab = min(lp_a.shape[-1], lp_b.shape[-1])  # heads may be padded past the tokenizer's size
    lp_a, lp_b = torch.log_softmax(lp_a[:, :vocab], -1), torch.log_softmax(lp_b[:, :vocab], -1)
    p_a, p_b = lp_a.exp(), lp_b.exp()
    kl = (p_a * (lp_a - lp_b)).sum(-1) / LN2
    lp_m = torch.log(0.5 * (p_a + p_b))
    js = 0.5 * ((p_a * (lp_a - lp_m)).sum(-1) + (p_b * (lp_b - lp_m)).sum(-1)) / LN2
    differ = (lp_a.argmax(-1) != lp_b.argmax(-1)).nonzero()
    first = int(differ[0, 0]) if len(differ) else None
    labels = [s.label for s in trace_a.steps]
    frame = pd.concat(
        [
            pd.DataFrame(
                {"step": range(len(labels)), "label": labels, "measure": "KL(A‖B)", "value": kl.clamp_min(0).tolist()}
            ),
            pd.DataFrame(
                {"step": range(len(labels)), "label": labels, "measure": "JS(A,B)", "value": js.clamp_min(0).tolist()}
            ),
        ],
        ignore_index=True,
    )
    return frame, first

"""Replay check: re-score a saved trace's tokens with a model (teacher forcing) and compare probabilities.

Useful after upgrading a library or switching device: one uncached forward over the whole path gives
every step's raw distribution; the processing chain is re-applied to get the processed one.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from .config import GenerationConfig
from .models import LoadedModel
from .processors import apply_chain, build_chain
from .stepper import eos_ids
from .tokens import vocab_for
from .trace import Trace

FAITHFUL = 1e-4
CLOSE = 1e-2


@dataclass
class ReplayReport:
    per_step: pd.DataFrame  # step, label, max_diff_raw, max_diff_proc
    max_diff: float
    verdict: str

    @property
    def ok(self) -> bool:
        return self.max_diff <= CLOSE


def verdict(max_diff: float) -> str:
    if max_diff <= FAITHFUL:
        return f"faithful: every recorded probability is reproduced within {FAITHFUL:g} (largest difference {max_diff:.2e})"
    if max_diff <= CLOSE:
        return (
            f"close: largest difference {max_diff:.2e}, above {FAITHFUL:g} but within {CLOSE:g}; numerical drift "
            "from another library version, dtype or device is the usual cause"
        )
    return (
        f"different: largest difference {max_diff:.2e} exceeds {CLOSE:g}; this model or its settings do not "
        "reproduce the trace"
    )


@torch.inference_mode()
def replay(lm: LoadedModel, trace: Trace, branch_id: int = 0) -> ReplayReport:
    steps = trace.path_steps(branch_id)
    if not steps:
        raise ValueError("the trace has no generated tokens to replay")
    if lm.vocab_size != trace.model.vocab_size:
        raise ValueError(
            f"the model's vocabulary has {lm.vocab_size} tokens but the trace's has "
            f"{trace.model.vocab_size}: replay with the model that made it ({trace.model.name})"
        )
    config = GenerationConfig.from_dict(trace.config)
    t = trace.prompt_len
    lm.check_fits(t + len(steps), "replaying this trace")
    ids = torch.tensor([trace.prompt_ids + [s.token_id for s in steps]], device=lm.device)
    logits = lm.model(input_ids=ids).logits[0, t - 1 : t - 1 + len(steps)].float()  # (steps, vocab)
    vocab = vocab_for(lm.tokenizer)
    ws = vocab.whitespace_ids() if config.block_ws_steps > 0 else []
    chain = build_chain(config, t, eos_ids(lm), ws, device=lm.device)
    rows = []
    for i, s in enumerate(steps):
        raw = torch.softmax(logits[i], -1)
        proc = torch.softmax(apply_chain(chain, ids[:, : t + i], logits[i : i + 1])[0], -1)
        d_raw = _max_diff(raw, [s.token_id] + s.top_raw.ids, [s.p_raw] + s.top_raw.probs)
        d_proc = _max_diff(proc, [s.token_id] + s.top_proc.ids, [s.p_proc] + s.top_proc.probs)
        rows.append({"step": s.step, "label": s.label, "max_diff_raw": d_raw, "max_diff_proc": d_proc})
    frame = pd.DataFrame(rows)
    worst = float(frame[["max_diff_raw", "max_diff_proc"]].to_numpy().max())
    return ReplayReport(frame, worst, verdict(worst))


def _max_diff(probs: torch.Tensor, ids: list[int], recorded: list[float]) -> float:
    now = probs[torch.tensor(ids, device=probs.device)]
    return float((now - torch.tensor(recorded, device=probs.device)).abs().max())

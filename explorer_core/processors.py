"""The logits-processing chain, in the order `generate()` applies it.

Penalties and masks first (repetition penalty, no-repeat n-gram, EOS and whitespace blocking), then
the warpers (temperature, top-k, top-p). transformers' own classes are used wherever they exist; the
one rule it lacks, blocking whitespace-only tokens early, is written in the same shape:
`(input_ids, scores) -> new scores`, never in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.generation.logits_process import (
    LogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .config import GenerationConfig

STAGES = ("raw", "repetition", "no_repeat_ngram", "block_eos", "block_ws", "temperature", "top_k", "top_p")


class BlockTokensForNewSteps(LogitsProcessor):
    """Mask a fixed set of token ids while fewer than `steps` new tokens have been generated."""

    def __init__(self, token_ids: list[int], prompt_length: int, steps: int, device: str = "cpu") -> None:
        if steps < 0 or prompt_length < 0:
            raise ValueError(f"steps={steps} and prompt_length={prompt_length} must be >= 0")
        # built once on the scores' device, so a step uploads nothing
        self.token_ids = torch.tensor(sorted(set(token_ids)), dtype=torch.long, device=device)
        self.prompt_length = prompt_length
        self.steps = steps

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[-1] - self.prompt_length >= self.steps or self.token_ids.numel() == 0:
            return scores
        return scores.index_fill(-1, self.token_ids.to(scores.device), -float("inf"))  # .to: a no-op when built there


@dataclass
class Stage:
    """One named rule of the chain."""

    name: str
    fn: LogitsProcessor


def build_chain(
    config: GenerationConfig, prompt_length: int, eos_ids: list[int], ws_ids: list[int], device: str = "cpu"
) -> list[Stage]:
    """The chain for one run. Rules that would do nothing are left out, as `generate()` does."""
    chain: list[Stage] = []
    if config.repetition_penalty != 1.0:
        chain.append(Stage("repetition", RepetitionPenaltyLogitsProcessor(config.repetition_penalty)))
    if config.no_repeat_ngram_size > 0:
        chain.append(Stage("no_repeat_ngram", NoRepeatNGramLogitsProcessor(config.no_repeat_ngram_size)))
    eos_steps = max(config.block_eos_steps, config.min_new_tokens)
    if eos_steps > 0 and eos_ids:
        proc = MinNewTokensLengthLogitsProcessor(prompt_length, eos_steps, eos_ids, device=device)
        chain.append(Stage("block_eos", proc))
    if config.block_ws_steps > 0 and ws_ids:
        block = BlockTokensForNewSteps(ws_ids, prompt_length, config.block_ws_steps, device=device)
        chain.append(Stage("block_ws", block))
    if config.greedy:
        return chain  # greedy decoding takes the argmax of the penalised scores; warpers do not apply
    if config.temperature != 1.0:
        chain.append(Stage("temperature", TemperatureLogitsWarper(config.temperature)))
    if config.top_k > 0:
        chain.append(Stage("top_k", TopKLogitsWarper(config.top_k)))
    if config.top_p < 1.0:
        chain.append(Stage("top_p", TopPLogitsWarper(config.top_p)))
    return chain


def apply_chain(chain: list[Stage], input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
    for stage in chain:
        scores = stage.fn(input_ids, scores)
    return scores


def apply_chain_staged(
    chain: list[Stage], input_ids: torch.LongTensor, scores: torch.FloatTensor
) -> tuple[torch.FloatTensor, list[torch.FloatTensor]]:
    """Like apply_chain, also returning every stage's scores: final (1, vocab) and a list of (vocab,) rows.

    Row 0 is the raw scores; row i the scores after stage i. Processors never work in place, so each
    row is the tensor that stage returned, kept without copying.
    """
    rows = [scores[0]]
    for stage in chain:
        scores = stage.fn(input_ids, scores)
        rows.append(scores[0])
    return scores, rows

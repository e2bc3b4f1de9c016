"""Cost of explaining one step on the default model, per part, at several prompt lengths; and the step
loop's extra reduction for varentropy. Run: `python -m bench.explain` (BENCH_ROUNDS, BENCH_LENGTHS,
BENCH_IG_STEPS: integrated gradients' most gradient passes, default the app's)."""

from __future__ import annotations

import os
import time

import torch

from explorer_core import explain, models
from explorer_core.config import GenerationConfig
from explorer_core.stepper import generate

from .common import ROUNDS, Series, machine

TEXT = (
    "The history of astronomy is long. People watched the sky to keep calendars, to steer ships and to "
    "predict the seasons, and over centuries they built instruments that showed more and more of it. "
)


IG_CAP = int(os.environ.get("BENCH_IG_STEPS", explain.IG_STEPS))  # most gradient passes IG may spend here


def trace_with_prompt(lm, n: int):
    """A two-step greedy trace whose prompt is exactly `n` tokens (plain text, no chat template)."""
    ids = lm.tokenizer(TEXT * (n // 20 + 2), add_special_tokens=False)["input_ids"][:n]
    text = lm.tokenizer.decode(ids)
    cfg = GenerationConfig(prompt=text, chat=False, max_new_tokens=2, min_new_tokens=2, temperature=0.0)
    return generate(lm, cfg).trace()


def one_length(lm, n: int, rounds: int) -> dict:
    trace = trace_with_prompt(lm, n)
    parts = {m: Series(m) for m in ("components", *explain.METHODS)}
    first = None
    for r in range(rounds):
        methods = explain.METHODS if r == 0 else explain.FAST_METHODS  # IG once per length: minutes on CPU
        e = explain.explain(lm, trace, 1, methods=methods, ig_steps=IG_CAP)
        for name, seconds in e.timing_s.items():
            parts[name].values.append(seconds)
        first = first or e
    return {
        "positions": trace.prompt_len + 1,
        "parts": parts,
        "ig_error": first.checks.get("integrated_gradients_completeness_error"),
        "ig_passes": first.inputs.ig_steps,
        "lrp_share": first.checks["attn_lrp_sum"] / first.logit_diff,
        "sum_error": first.checks["sum_error"],
    }


def varentropy_cost(vocab: int, rounds: int = 2000) -> tuple[float, float]:
    """Microseconds per step: the loop's varentropy (two dot products) beside its existing entropy reduction."""
    raw = torch.randn(vocab) * 3
    both = torch.softmax(torch.stack([raw, raw]), -1)

    def per_call(fn) -> float:
        start = time.perf_counter()
        for _ in range(rounds):
            fn()
        return (time.perf_counter() - start) / rounds * 1e6

    def varentropy():
        centred = raw - torch.dot(both[0], raw)
        return torch.dot(both[0], centred * centred)

    return per_call(varentropy), per_call(lambda: torch.special.entr(both).sum(-1))


def main() -> None:
    lengths = [int(x) for x in os.environ.get("BENCH_LENGTHS", "50,200,500").split(",")]
    lm = models.load()
    print(machine())
    print(
        f"default model, one explained step; integrated gradients adaptive (at most {IG_CAP} gradient "
        f"passes, stops when its intervals' errors add up to {explain.IG_TOLERANCE:.0%})\n"
    )
    print("| prompt tokens | part | min s | median s | max s | rounds |")
    print("|---|---|---|---|---|---|")
    for n in lengths:
        res = one_length(lm, n, ROUNDS)
        for name, series in res["parts"].items():
            lo, mid, hi = min(series.values), series.median, max(series.values)
            label = explain.METHOD_NAMES.get(name, "component breakdown (one hooked forward)")
            print(f"| {n} | {label} | {lo:.2f} | {mid:.2f} | {hi:.2f} | {len(series.values)} |")
        print(
            f"| {n} | checks | IG completeness error {res['ig_error']:.1%} after {res['ig_passes']} passes "
            f"| LRP sum / logit difference {res['lrp_share']:.2f} | parts-sum error {res['sum_error']:.1e} | |"
        )
    extra, entropy = varentropy_cost(lm.vocab_size)
    print(f"\nstep loop: varentropy {extra:.0f} µs per step, beside {entropy:.0f} µs for the entropies it already has")


if __name__ == "__main__":
    main()

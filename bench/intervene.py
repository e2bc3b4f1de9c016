"""What if? on the default model: what one intervention and a full sweep cost beside a decoding step and a
prefill, at three prompt lengths; the sweep's rows per batched forward (EXPLORER_INTERVENE_BATCH) compared.

Per prompt length (a paragraph repeated, chat off; a 4-step greedy trace, the probe at step 3), interleaved
over ROUNDS rounds (median): one decoding step of a live run (`Run.step()`, attention capture off: the
baseline), the cached one-token forward alone, a prefill of the probe's sequence, `Probe(...)`, one
intervention (head 15.4 zeroed) at the step's position with and without the final norm held, and at every
position. Then one sweep (270 heads + 30 MLPs at the step's position) per length, and at the middle length
the sweep with 8, 16 and 32 rows per forward, ROUNDS each: every sweep in a child process of its own, started
with EXPLORER_INTERVENE_BATCH set (the module reads it at import), so that its peak RSS growth is not hidden
by memory an earlier sweep left with the allocator.

    python -m bench.intervene            # BENCH_ROUNDS (default 3), BENCH_INTERVENE_LENGTHS, _BATCHES
    python -m bench.intervene --write    # also as section 11 of BENCHMARKS.md (kept when bench.run_all reruns)
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

from explorer_core import intervene, models
from explorer_core.config import GenerationConfig
from explorer_core.stepper import Run, generate

from .common import Series, interleave, machine, timed
from .explain import TEXT

SECTION = "11. Interventions (measured separately, `python -m bench.intervene`)"
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
LENGTHS = [int(x) for x in os.environ.get("BENCH_INTERVENE_LENGTHS", "50,200,800").split(",")]
BATCHES = [int(x) for x in os.environ.get("BENCH_INTERVENE_BATCHES", "8,16,32").split(",")]
NEW, STEP = 4, 3  # a trace of NEW steps; the probe at STEP (T = prompt + STEP positions)
ONE = intervene.Target("head", 15, 4)


def prompt_of(lm, n: int) -> str:
    """Plain text of about `n` tokens: TEXT repeated."""
    ids = lm.tokenizer(TEXT * (n // 20 + 2), add_special_tokens=False)["input_ids"][:n]
    return lm.tokenizer.decode(ids)


def config(text: str, new: int) -> GenerationConfig:
    return GenerationConfig(
        prompt=text, chat=False, max_new_tokens=new, min_new_tokens=new, block_eos_steps=new, clean_stop=False,
        temperature=0.0, capture_attention=False, logit_lens=False,
    )  # fmt: skip


class PeakRSS:
    """Largest resident set size seen (sampled every 5 ms) while the block runs, less the size before it."""

    def __init__(self) -> None:
        self.proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()

    def __enter__(self):
        gc.collect()
        self.before = self.peak = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.before) / 2**20


def small_timings(lm, n: int) -> tuple[int, dict[str, Series]]:
    """(T, name -> Series) for the per-call figures at prompt length n, interleaved over ROUNDS rounds."""
    text = prompt_of(lm, n)
    trace = generate(lm, config(text, NEW)).trace()
    probe = intervene.Probe(lm, trace, STEP)
    live = Run(lm, config(text, ROUNDS + 1))
    live.prefill()
    live.step()  # step 0 reads the prefill's logits; every later step runs one cached forward

    def cached_forward() -> float:
        cache = copy.deepcopy(probe.cache)
        with torch.inference_mode():
            return timed(lambda: lm.model(input_ids=probe.input_ids[:, -1:], cache=cache))

    def prefill() -> float:
        with torch.inference_mode():
            return timed(lambda: lm.model(input_ids=probe.input_ids, use_cache=True, logits_to_keep=1))

    at_step = [intervene.Intervention(ONE)]
    everywhere = [intervene.Intervention(ONE, scope="all")]
    series = interleave(
        {
            "step": lambda: timed(live.step),
            "forward": cached_forward,
            "prefill": prefill,
            "build": lambda: timed(lambda: intervene.Probe(lm, trace, STEP)),
            "step_iv": lambda: timed(lambda: probe.run(at_step, frozen=False)),
            "step_iv_frozen": lambda: timed(lambda: probe.run(at_step, frozen=True)),
            "all_iv": lambda: timed(lambda: probe.run(everywhere, frozen=False)),
            "all_iv_frozen": lambda: timed(lambda: probe.run(everywhere, frozen=True)),
        },
        ROUNDS,
    )
    return probe.T, series


def sweep(lm, n: int) -> dict:
    """One full sweep at prompt length n in this process: seconds, peak RSS growth (MB) over the RSS with
    the probe built, and the correlation of measured and predicted changes."""
    probe = intervene.Probe(lm, generate(lm, config(prompt_of(lm, n), NEW)).trace(), STEP)
    with PeakRSS() as rss:
        start = time.perf_counter()
        effects = probe.sweep()
        took = time.perf_counter() - start
    rows = probe.rows_per_cache if probe.cache is not None else probe.rows_uncached
    return {"s": took, "mb": rss.growth_mb, "r": intervene.correlation(effects), "batch": intervene.BATCH, "rows": rows}


def sweep_child(n: int, batch: int) -> dict:
    """`sweep` in a fresh process with EXPLORER_INTERVENE_BATCH=batch (model load excluded from its figures)."""
    env = os.environ | {"EXPLORER_INTERVENE_BATCH": str(batch)}
    out = subprocess.run(
        [sys.executable, "-m", "bench.intervene", "--sweep", str(n)],
        env=env, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, check=True,
    )  # fmt: skip
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["batch"] == batch, got
    return got


def load_average() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


NAMES = {
    "step": "one decoding step (`Run.step()` of a live run, capture off)",
    "forward": "its model call alone (cached one-token forward)",
    "prefill": "a prefill of the T positions (one forward)",
    "build": "`Probe(lm, trace, 3)`",
    "step_iv": "one intervention at the step's position (`run([iv], frozen=False)`)",
    "step_iv_frozen": "… and the final norm held too (`frozen=True`)",
    "all_iv": 'one intervention at every position (scope "all", `frozen=False`)',
    "all_iv_frozen": "… and the final norm held too (`frozen=True`)",
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    logging.disable(logging.WARNING)
    if "--sweep" in argv:  # the child of sweep_child
        print(json.dumps(sweep(models.load(), int(argv[argv.index("--sweep") + 1]))), flush=True)
        return
    load_before = load_average()
    lm = models.load()
    n_layers, n_heads = lm.n_layers, lm.n_heads
    lines = [
        f"## {SECTION}\n",
        f"`python -m bench.intervene --write`, {machine()}. Default model "
        f"({n_layers} layers × {n_heads} heads, float32 on CPU). Envelope: prompts of {', '.join(map(str, LENGTHS))} "
        f"tokens (a paragraph repeated, chat off), a {NEW}-step greedy trace, the probe at step {STEP} (T = prompt + "
        f"{STEP} positions); the single intervention zeroes head {ONE}; {intervene.BATCH} rows per batched forward "
        f"unless stated. Per-call figures: min / median / max of {ROUNDS} interleaved rounds; ratios are of medians.\n",
    ]

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    checks = per_call_table(lm, say)
    n_ivs = n_layers * n_heads + n_layers
    sweep_table(n_layers, n_heads, say)
    fastest, middle = batch_table(n_ivs, say)
    say(
        f"\nFastest at {middle} tokens: {fastest} rows per forward. Targets: {sum(checks)} of {len(checks)} met "
        "(one intervention at the step's position ≤ 2 × a decoding step, with and without the final norm held; "
        f"at every position ≤ 1 × a prefill). Load average (1/5/15 min) at the start {load_before}, at the end "
        f"{load_average()}."
    )
    if "--write" in argv:
        from tools import mdsections

        mdsections.write(Path(__file__).resolve().parents[1] / "BENCHMARKS.md", SECTION, "\n".join(lines) + "\n")


def per_call_table(lm, say) -> list[bool]:
    """One decoding step, a prefill, the probe's build and one intervention per scope, at each length."""
    say("| T | what | min s | median s | max s | ratio | target |")
    say("|---|---|---|---|---|---|---|")
    checks = []
    for n in LENGTHS:
        T, series = small_timings(lm, n)
        step, prefill = series["step"].median, series["prefill"].median
        for key, s in series.items():
            ratio, target = "", ""
            if key in ("forward", "step_iv", "step_iv_frozen"):
                ratio = f"{s.median / step:.2f} × step"
            if key in ("step_iv", "step_iv_frozen"):
                checks.append(s.median <= 2 * step)
                target = f"≤ 2 × step: {verdict(checks[-1])}"
            if key in ("build", "all_iv", "all_iv_frozen"):
                ratio = f"{s.median / prefill:.2f} × prefill"
            if key == "all_iv":
                checks.append(s.median <= prefill)
                target = f"≤ 1 × prefill: {verdict(checks[-1])}"
            lo, mid, hi = min(s.values), s.median, max(s.values)
            say(f"| {T} | {NAMES[key]} | {lo:.3f} | {mid:.3f} | {hi:.3f} | {ratio} | {target} |")
        gc.collect()
    say(
        "\nOne intervention at every position is one uncached forward of the T positions, the work of a prefill "
        "(which also writes the cache): its ratio sits at 1 by construction, within this VM's noise."
    )
    return checks


def sweep_table(n_layers: int, n_heads: int, say) -> None:
    """A full sweep at each length, each in a process of its own (so its memory figure is its own)."""
    n_ivs = n_layers * n_heads + n_layers
    say(
        f"\n**Sweep** ({n_layers * n_heads} heads + {n_layers} MLPs zeroed one at a time at the step's position, "
        f"`probe.sweep()`, up to {intervene.BATCH} rows per forward, fewer where their keys and values would pass "
        f"EXPLORER_INTERVENE_MB ({intervene.BATCH_MB} MB), one run per length, each in a process of its own; "
        "peak RSS growth over the RSS with the model loaded and the probe built):\n"
    )
    say(
        "| prompt tokens | seconds | rows per forward | forwards | ms per intervention | peak RSS growth (MB) "
        "| r(measured, predicted) |"
    )
    say("|---|---|---|---|---|---|---|")
    for n in LENGTHS:
        got = sweep_child(n, intervene.BATCH)
        forwards = -(-n_ivs // got["rows"])
        say(
            f"| {n} | {got['s']:.2f} | {got['rows']} | {forwards} | {got['s'] / n_ivs * 1000:.1f} | {got['mb']:.0f} "
            f"| {got['r']:.2f} |"
        )


def batch_table(n_ivs: int, say) -> tuple[int, int]:
    """The sweep at the middle length with each EXPLORER_INTERVENE_BATCH: (the fastest, that length)."""
    middle = LENGTHS[len(LENGTHS) // 2]
    say(
        f"\n**Rows per batched forward** (the same sweep at {middle} prompt tokens, {ROUNDS} interleaved rounds, "
        "each run in a process of its own with EXPLORER_INTERVENE_BATCH set):\n"
    )
    say("| EXPLORER_INTERVENE_BATCH | forwards | min s | median s | max s | peak RSS growth, largest (MB) |")
    say("|---|---|---|---|---|---|")
    memory: dict[int, float] = {}
    rows: dict[int, int] = {}

    def once(batch: int) -> float:
        got = sweep_child(middle, batch)
        memory[batch] = max(memory.get(batch, 0.0), got["mb"])
        rows[batch] = got["rows"]
        return got["s"]

    by_batch = interleave({b: (lambda b=b: once(b)) for b in BATCHES}, ROUNDS)
    for b, s in by_batch.items():
        say(
            f"| {b} ({rows[b]} within the memory budget) | {-(-n_ivs // rows[b])} | {min(s.values):.2f} | "
            f"{s.median:.2f} | {max(s.values):.2f} | {memory[b]:.0f} |"
        )
    return min(by_batch, key=lambda b: by_batch[b].median), middle


if __name__ == "__main__":
    main()

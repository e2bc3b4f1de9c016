"""The fidelity check's cost at load, and where recorded attention comes from: the model's own eager
function (way "own") against the fast copy the check proved equal (way "fast"), on the default model.

At 500 / 1,000 / 2,000 prompt tokens, 32 new tokens, greedy: a run without attention, a run recording
every row through the fast copy (what the default model uses) and one through the model's own eager
function (what a model gets where the copy is not proven equal), interleaved over ROUNDS rounds.

    python -m bench.fidelity            # print
    python -m bench.fidelity --write    # also as section 10 of BENCHMARKS.md (kept when bench.run_all reruns)
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from bench.common import ROUNDS, interleave, machine
from bench.longctx import prompt_text
from explorer_core import fidelity, models
from explorer_core.config import GenerationConfig
from explorer_core.stepper import Run

SECTION = "10. The fidelity check and where recorded rows come from"
SIZES = (500, 1000, 2000)
NEW = 32


def timed_run(lm, cfg: GenerationConfig, way: str | None) -> float:
    run = Run(lm, cfg)
    if way is not None:
        run.recorder.way = way
    start = time.perf_counter()
    for _ in run:
        pass
    took = time.perf_counter() - start
    if run.recorder is not None:
        run.recorder.discard()
    return took


def probe_costs(lm) -> tuple[float, float, fidelity.Fidelity]:
    """Seconds of the check measured afresh, and read back from its cache file in a new process's place."""
    start = time.perf_counter()
    fid = fidelity.check(lm, Run, use_disk=False)
    fresh = time.perf_counter() - start
    fidelity._memo.clear()  # as a new process: only the file remains
    fidelity.check(lm, Run)  # writes the file if no earlier load did
    fidelity._memo.clear()
    start = time.perf_counter()
    fidelity.check(lm, Run)
    return fresh, time.perf_counter() - start, fid


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    logging.disable(logging.WARNING)
    lm = models.load()
    fresh, cached, fid = probe_costs(lm)
    lm.fidelity = fid
    lines = [f"## {SECTION}\n", f"`python -m bench.fidelity`, {machine()}, {ROUNDS} rounds.\n"]

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    say(
        f"The check at load on the default model (float32): {fresh:.2f} s measured ({fid.probe_tokens}-token "
        f"probe, {fid.new_tokens} steps: the tool's runs, generate() and one eager forward), {cached * 1000:.1f} ms "
        f"read back from its cache file on a later load. Chosen way: {fid.way}. Figures: "
        + "; ".join(f"{c.feature} {'exact' if c.ok else 'refused'} ({c.figure:.1e})" for c in fid.checks)
        + ".\n"
    )
    say(
        "| prompt tokens | no attention (s) | fast copy (s) | model's own eager function (s) | fast / none | own / none |"
    )
    say("|---|---|---|---|---|---|")
    for size in SIZES:
        cfg = GenerationConfig(
            prompt=prompt_text(lm.tokenizer, size), chat=False, max_new_tokens=NEW, min_new_tokens=NEW,
            block_eos_steps=NEW, clean_stop=False, temperature=0.0,
        )  # fmt: skip
        series = interleave(
            {
                "none": lambda c=cfg: timed_run(lm, c.replace(capture_attention=False), None),
                "fast": lambda c=cfg: timed_run(lm, c, "fast"),
                "own": lambda c=cfg: timed_run(lm, c, "own"),
            },
            ROUNDS,
        )
        none, fast, own = (series[k].median for k in ("none", "fast", "own"))
        say(f"| {size} | {none:.2f} | {fast:.2f} | {own:.2f} | {fast / none:.2f} | {own / none:.2f} |")
    say(
        "\nMedians. The default model records through the fast copy, which the check proved equal to its own "
        "weights (largest difference above); a model where it is not proven pays the own-function column."
    )
    if "--write" in argv:
        from tools import mdsections

        mdsections.write(Path(__file__).resolve().parents[1] / "BENCHMARKS.md", SECTION, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""The fidelity check's cost at load, and where recorded attention comes from: the model's own eager
function (way "own") against the fast copy the check proved equal (way "fast"), on the default model.

For each prompt length (500 / 1,000 / 2,000 tokens) one run of 32 new tokens with attention recorded,
each way, and one without attention; the ratio to no recording is what the long-prompt targets bound.

    python -m bench.fidelity
"""

from __future__ import annotations

import logging
import time

from bench.longctx import prompt_text
from explorer_core import fidelity, models
from explorer_core.config import GenerationConfig
from explorer_core.stepper import Run

SIZES = (500, 1000, 2000)
NEW = 32


def timed_run(lm, cfg: GenerationConfig, way: str | None) -> float:
    run = Run(lm, cfg)
    if way is not None and run.recorder is not None:
        run.recorder.way = way
    start = time.perf_counter()
    for _ in run:
        pass
    took = time.perf_counter() - start
    if run.recorder is not None:
        run.recorder.discard()
    return took


def main() -> None:
    logging.disable(logging.WARNING)
    lm = models.load()
    start = time.perf_counter()
    fid = fidelity.check(lm, Run, use_disk=False)
    probe = time.perf_counter() - start
    lm.fidelity = fid
    print(
        f"fidelity check at load: {probe:.2f} s ({fid.probe_tokens}-token probe, {fid.new_tokens} steps); way={fid.way}"
    )
    for c in fid.checks:
        print(f"  {c.feature:9s} ok={c.ok} measured={c.figure} tolerance={c.tolerance}")
    print("| prompt tokens | no attention (s) | fast copy (s) | own eager function (s) | fast / none | own / none |")
    print("|---|---|---|---|---|---|")
    for size in SIZES:
        cfg = GenerationConfig(
            prompt=prompt_text(lm.tokenizer, size), chat=False, max_new_tokens=NEW, min_new_tokens=NEW,
            block_eos_steps=NEW, clean_stop=False, temperature=0.0,
        )  # fmt: skip
        none = min(timed_run(lm, cfg.replace(capture_attention=False), None) for _ in range(2))
        fast = min(timed_run(lm, cfg, "fast") for _ in range(2))
        own = min(timed_run(lm, cfg, "own") for _ in range(2))
        print(f"| {size} | {none:.2f} | {fast:.2f} | {own:.2f} | {fast / none:.2f} | {own / none:.2f} |")


if __name__ == "__main__":
    main()

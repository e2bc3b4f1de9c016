"""CPU: the capture path against eager attention, the way attention rows were read before it.

Default model, 32 new tokens (greedy), prompts of 128, 512 and 1,024 tokens, each contender timed in
turn (bench.common.interleave) and compared with `model.generate` on sdpa without attention:
- generate, eager attention + output_attentions: every step's rows, the usual way to read them;
- the explorer, capture on (sdpa runs the model, rows recomputed from each layer's q and K);
- in bfloat16 also the explorer with attention_precision=eager (the model's own eager function).

    python -m bench.capture            # BENCH_ROUNDS (default 5), BENCH_CAPTURE_SIZES, BENCH_CAPTURE_DTYPES
    python -m bench.capture --write    # also as section 9 of BENCHMARKS.md (kept when bench.run_all reruns)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from explorer_core import models
from explorer_core.config import GenerationConfig
from explorer_core.stepper import Run

from .common import ROUNDS, interleave, machine
from .longctx import prompt_text

SIZES = [int(x) for x in os.environ.get("BENCH_CAPTURE_SIZES", "128,512,1024").split(",")]
DTYPES = os.environ.get("BENCH_CAPTURE_DTYPES", "float32,bfloat16").split(",")
NEW = 32


def contenders(lm, ids: list[int], text: str) -> dict:
    """Name -> a function that runs once and returns its seconds."""
    import time

    x = torch.tensor([ids])

    def generate(implementation: str, attentions: bool):
        def once() -> float:
            before = lm.model.config._attn_implementation
            lm.model.set_attn_implementation(implementation)
            start = time.perf_counter()
            with torch.inference_mode():
                lm.model.generate(
                    x, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                    output_attentions=attentions, return_dict_in_generate=attentions,
                )  # fmt: skip
            took = time.perf_counter() - start
            lm.model.set_attn_implementation(before)
            return took

        return once

    def explorer(precision: str):
        def once() -> float:
            cfg = GenerationConfig(
                prompt=text, chat=False, max_new_tokens=NEW, min_new_tokens=NEW, temperature=0.0,
                repetition_penalty=1.0, attention_precision=precision,
            )  # fmt: skip
            start = time.perf_counter()
            run = Run(lm, cfg)
            for _ in run:
                pass
            took = time.perf_counter() - start
            run.recorder.discard()
            return took

        return once

    out = {
        "generate, sdpa, no attention": generate("sdpa", False),
        "generate, eager + output_attentions": generate("eager", True),
        "explorer, capture (float32 rows)": explorer("float32"),
    }
    if lm.model.dtype != torch.float32:
        out["explorer, attention_precision=eager"] = explorer("eager")
    return out


SECTION = "9. Reading attention rows: capture against eager output_attentions"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    lines = [
        f"## {SECTION}\n",
        f"`python -m bench.capture`, {machine()}, {ROUNDS} rounds. Eager attention with `output_attentions` "
        "is how transformers hands out attention rows: every layer's full T×T at the prefill, one row per "
        "layer after. The explorer runs the model on sdpa and recomputes the rows it keeps from each layer's "
        "q and K (the prompt's own matrix in chunks, pooled to its budget).",
    ]

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    for dtype in DTYPES:
        lm = models.load(dtype=dtype, device="cpu")
        say(f"\n**{dtype}**, default model, {NEW} new tokens, greedy (seconds; ratio = median time / generate's)\n")
        say("| prompt tokens | what | min s | median s | max s | ratio to generate |")
        say("|---|---|---|---|---|---|")
        against = []
        for n in SIZES:
            text = prompt_text(lm.tokenizer, n)
            ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
            series = interleave(contenders(lm, ids, text), ROUNDS)
            base = series["generate, sdpa, no attention"].median
            for name, s in series.items():
                lo, mid, hi = min(s.values), s.median, max(s.values)
                say(f"| {len(ids)} | {name} | {lo:.2f} | {mid:.2f} | {hi:.2f} | {mid / base:.2f} |")
            eager = series["generate, eager + output_attentions"].median
            mine = ", ".join(
                f"{k.split(', ', 1)[1]} {v.median / eager:.2f}" for k, v in series.items() if "explorer" in k
            )
            against.append(f"{len(ids)} tokens: {mine}")
        say(f"\nTime against eager + output_attentions ({dtype}): " + "; ".join(against) + ".")
    if "--write" in argv:
        from tools import mdsections

        mdsections.write(Path(__file__).resolve().parents[1] / "BENCHMARKS.md", SECTION, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

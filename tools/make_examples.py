"""Regenerate the example traces in examples/ with the CLI on the embedded default model."""

from __future__ import annotations

import shutil
from pathlib import Path

from explorer_core.cli import main

ROOT = Path(__file__).resolve().parents[1] / "examples"
RUNS = {
    "sky-sampled": [
        "--prompt",
        "Explain why the sky is blue in one short paragraph.",
        "--max_new_tokens",
        "48",
        "--min_new_tokens",
        "24",
        "--seed",
        "42",
        "--logit_lens",
        "true",
    ],
    "python-greedy": [
        "--prompt",
        "Write a Python function that reverses a string.",
        "--temperature",
        "0",
        "--max_new_tokens",
        "40",
        "--clean_stop",
        "false",
    ],
    "story-snapshots-only": [
        "--prompt",
        "Tell a two-sentence story about a lighthouse.",
        "--temperature",
        "1.1",
        "--top_p",
        "0.9",
        "--max_new_tokens",
        "60",
        "--min_new_tokens",
        "20",
        "--block_eos_steps",
        "10",
        "--attn_every",
        "5",
        "--no_companion",
    ],
}


def run() -> None:
    for name, flags in RUNS.items():
        out = ROOT / name
        shutil.rmtree(out, ignore_errors=True)
        code = main([*flags, "--out_dir", str(out), "--no_png", "-q"])
        if code:
            raise SystemExit(f"example {name} failed with exit code {code}")
        print(f"wrote {out}")


if __name__ == "__main__":
    run()

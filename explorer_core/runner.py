"""The CLI's run: load, generate with a progress bar, write artifacts; Ctrl-C still writes the partial trace."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

from . import artifacts, models
from .config import GenerationConfig
from .limits import Limits
from .stepper import Run


def run_cli(config: GenerationConfig, out_dir: str, pngs: bool = True, quiet: bool = False, companion: bool = True) -> int:
    try:
        limits = Limits.from_env()
        limits.check_config(config)
        if not quiet:
            print(f"loading {config.model} ...", file=sys.stderr)
        lm = models.load(config.model, dtype=config.dtype, device=config.device, limits=limits)
        run = Run(lm, config, limits)
    except (models.ModelLoadError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    reason = None
    start = time.perf_counter()
    bar = tqdm(total=config.max_new_tokens, unit="tok", disable=quiet, file=sys.stderr, leave=False)
    try:
        for step in run:
            bar.update(1)
            bar.set_postfix_str(f"{step.label[:20]!s} p={step.p_raw:.2f}", refresh=False)
    except KeyboardInterrupt:
        reason = "interrupted"
        print("\ninterrupted: writing the partial trace", file=sys.stderr)
    finally:
        bar.close()
    elapsed = time.perf_counter() - start
    trace = run.trace(stop_reason=reason)
    paths = artifacts.write_all(trace, run.attention() if companion else None, out_dir, pngs=pngs)
    if not quiet:
        print(trace.output_text)
        print(f"{len(trace.steps)} tokens in {elapsed:.2f} s ({len(trace.steps) / elapsed:.1f} tok/s), "
              f"stopped: {trace.stop_reason}; wrote {len(paths)} files to {out_dir}", file=sys.stderr)
    return 130 if reason == "interrupted" else 0

"""The CLI's run: load, generate with a progress bar, write artifacts; Ctrl-C still writes the partial trace."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from tqdm import tqdm

from . import artifacts, models
from .config import GenerationConfig
from .limits import Limits
from .stepper import Run


def run_cli(
    config: GenerationConfig,
    out_dir: str,
    pngs: bool = True,
    quiet: bool = False,
    companion: bool = True,
    html: bool = False,
) -> int:
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
    attention = run.attention()
    paths = artifacts.write_all(trace, attention if companion else None, out_dir, pngs=pngs)
    if html:
        from . import export_html

        page = Path(out_dir) / "trace.html"
        page.write_text(export_html.build(trace, attention), encoding="utf-8")
        paths.append(page)
    if not quiet:
        print(trace.output_text)
        print(
            f"{len(trace.steps)} tokens in {elapsed:.2f} s ({len(trace.steps) / elapsed:.1f} tok/s), "
            f"stopped: {trace.stop_reason}; wrote {len(paths)} files to {out_dir}",
            file=sys.stderr,
        )
    return 130 if reason == "interrupted" else 0


def run_replay(trace_path: str, model: str | None, dtype: str, device: str) -> int:
    """CLI replay check: exit 0 when faithful or close, 1 when different, 2 when it cannot run."""
    from . import replay
    from . import trace as trace_io

    try:
        trace, _ = trace_io.load(trace_path)
        lm = models.load(model or trace.model.name, dtype=dtype, device=device, limits=Limits.from_env())
        report = replay.replay(lm, trace)
    except (trace_io.TraceError, models.ModelLoadError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    worst = report.per_step.assign(worst=report.per_step[["max_diff_raw", "max_diff_proc"]].max(axis=1))
    worst = worst.sort_values("worst", ascending=False).head(5)
    print(f"replayed {len(report.per_step)} steps of {trace_path} with {lm.source.name} on {lm.device}")
    print("largest differences (step, token, raw, processed):")
    for _, row in worst.iterrows():
        print(
            f"  {int(row['step']):5d}  {row['label'][:20]:20s}  {row['max_diff_raw']:.2e}  {row['max_diff_proc']:.2e}"
        )
    print(report.verdict)
    return 0 if report.ok else 1

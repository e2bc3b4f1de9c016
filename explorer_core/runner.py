"""The CLI's run: load, generate with a progress bar, write artifacts; Ctrl-C still writes the partial trace."""

from __future__ import annotations

import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from . import artifacts, models, tracefile
from .config import GenerationConfig
from .limits import Limits
from .stepper import Run


def _say(text: str) -> None:
    print(text, file=sys.stderr)


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
            _say(f"loading {config.model} ...")
        lm = models.load(
            config.model, dtype=config.dtype, device=config.device, limits=limits, device_map=config.device_map
        )
        path = tracefile.recording_path(Path(out_dir) / "trace.json") if companion else None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        run = Run(lm, config, limits, attention_path=str(path) if path else None)
    except (models.ModelLoadError, ValueError, OSError) as exc:
        _say(f"error: {exc}")
        return 2
    except KeyboardInterrupt:
        _say("\ninterrupted before generation started: nothing written")
        return 130
    reason = _generate(run, config, quiet)
    start = time.perf_counter()
    elapsed = max(sum(s.time_s for s in run.steps) + run.prefill_s, 1e-9)
    with _no_interrupt_while("saving"):
        written = _save(run, reason, out_dir, pngs, companion, html)
    if not quiet:
        print(run.output_text())
        _say(
            f"{len(run.steps)} tokens in {elapsed:.2f} s ({len(run.steps) / elapsed:.1f} tok/s), "
            f"stopped: {reason or run.stop_reason}; wrote {len(written.paths)} files to {out_dir}"
            f" (saving took {time.perf_counter() - start:.1f} s)"
        )
    if run.error:
        _say(f"error: {run.error}; the {len(run.steps)} steps before it were saved")
    for name, why in written.failed:
        _say(f"warning: {name} was not written: {why}")
    return 130 if reason == "interrupted" else (1 if run.error else 0)


def _generate(run: Run, config: GenerationConfig, quiet: bool) -> str | None:
    """Iterate the run with a progress bar; 'interrupted' when Ctrl-C stopped it."""
    bar = tqdm(total=config.max_new_tokens, unit="tok", disable=quiet, file=sys.stderr, leave=False)
    try:
        for step in run:
            bar.update(1)
            bar.set_postfix_str(f"{step.label[:20]!s} p={step.p_raw:.2f}", refresh=False)
    except KeyboardInterrupt:
        _say("\ninterrupted: writing the partial trace")
        return "interrupted"
    finally:
        bar.close()
    return None


def _save(run: Run, reason: str | None, out_dir: str, pngs: bool, companion: bool, html: bool) -> artifacts.Written:
    trace = run.trace(stop_reason=reason)
    attention = run.attention() if companion else None
    if run.recorder is not None:
        if attention is None:
            run.recorder.discard()  # stopped before the prompt was read: nothing to keep
        else:
            run.recorder.finish()
    written = artifacts.write_all(trace, attention, out_dir, pngs=pngs)
    if html:
        from . import export_html

        page = Path(out_dir) / "trace.html"
        page.write_text(export_html.build(trace, attention), encoding="utf-8")
        written.paths.append(page)
    return written


@contextmanager
def _no_interrupt_while(what: str):
    """Ctrl-C during a save would lose the partial trace: say so and finish the save instead."""
    if sys.platform == "win32" or signal.getsignal(signal.SIGINT) is None:
        yield
        return

    def handler(signum, frame):
        _say(f"\nstill {what}: please wait, it finishes in a moment")

    before = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def run_replay(trace_path: str, model: str | None, dtype: str, device: str) -> int:
    """CLI replay check: exit 0 when faithful or close, 1 when different, 2 when it cannot run."""
    from . import replay
    from .trace import TraceError

    try:
        limits = Limits.from_env()
        trace, _ = tracefile.load(trace_path)
        limits.check_replay(trace)
        lm = models.load(model or trace.model.name, dtype=dtype, device=device, limits=limits)
        report = replay.replay(lm, trace)
    except (TraceError, models.ModelLoadError, ValueError) as exc:
        _say(f"error: {exc}")
        return 2
    except KeyboardInterrupt:
        _say("\ninterrupted")
        return 130
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

"""The CLI's run: load, generate with a progress bar, write artifacts; Ctrl-C still writes the partial trace.

A disk that fills during the run keeps what came before it: the run stops, the companion is cut back
to its last whole row, trace.json is written first (it is small), then the pair. A folder that cannot
be written is refused before any model work, so no result is computed only to be lost.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from . import artifacts, models, tracefile
from .config import GenerationConfig
from .limits import Limits
from .recorder import AttentionRecorder
from .stepper import Run


def _say(text: str) -> None:
    print(text, file=sys.stderr)


def _why(exc: OSError) -> str:
    """An OSError in words: the system's reason and the file it concerns, without '[Errno 28]'."""
    where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
    return f"{exc.strerror or exc}{where}"


def run_cli(
    config: GenerationConfig,
    out_dir: str,
    pngs: bool = True,
    quiet: bool = False,
    companion: bool = True,
    html: bool = False,
) -> int:
    path = None
    try:
        limits = Limits.from_env()
        limits.check_config(config)
        problem = artifacts.writable_problem(Path(out_dir))  # before any model work: a result must have a home
        if problem:
            raise ValueError(f"--out_dir {out_dir} {problem}: choose a folder you can write to")
        if not quiet:
            _say(f"loading {config.model} ...")
        lm = models.load(
            config.model, dtype=config.dtype, device=config.device, limits=limits, device_map=config.device_map
        )
        path = tracefile.recording_path(Path(out_dir) / "trace.json") if companion else None
        run = Run(lm, config, limits, attention_path=str(path) if path else None)
    except (models.ModelLoadError, ValueError, OSError) as exc:
        if path is not None:
            path.unlink(missing_ok=True)  # a recording begun and refused (e.g. a full disk) is nobody's
        _say(f"error: {_why(exc) if isinstance(exc, OSError) else exc}")
        return 2
    except KeyboardInterrupt:
        if path is not None:
            path.unlink(missing_ok=True)
        _say("\ninterrupted before generation started: nothing written")
        return 130
    claimed = tracefile.claim(path) if path is not None and path.exists() else None
    try:
        return _generate_and_save(run, config, out_dir, pngs, quiet, companion, html)
    finally:
        if claimed is not None:
            os.close(claimed)


def _generate_and_save(
    run: Run, config: GenerationConfig, out_dir: str, pngs: bool, quiet: bool, companion: bool, html: bool
) -> int:
    reason = _generate(run, config, quiet)
    start = time.perf_counter()
    elapsed = max(sum(s.time_s for s in run.steps) + run.prefill_s, 1e-9)
    json_path = Path(out_dir) / "trace.json"
    with _no_interrupt_while("saving"):
        try:
            written = _save(run, reason, json_path, pngs, companion, html)
        except (OSError, ValueError) as exc:  # trace.json itself could not be written (a full disk, over the cap)
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            _say(f"error: could not write {json_path}: {why}; nothing was saved")
            return 1
    if not quiet:
        print(run.output_text())
        _say(
            f"{len(run.steps)} tokens in {elapsed:.2f} s ({len(run.steps) / elapsed:.1f} tok/s), "
            f"stopped: {reason or run.stop_reason}; wrote {len(written.paths)} files to {out_dir}"
            f" (saving took {time.perf_counter() - start:.1f} s)"
        )
    for name, why in written.failed:
        _say(f"warning: {name} was not written: {why}")
    if run.error:
        _say(f"error: {run.error}; the {len(run.steps)} steps before it were saved in {json_path}")
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
    except OSError as exc:  # the prompt's attention could not be written (a full disk): nothing generated yet
        where = run.recorder.writer.path.parent if run.recorder is not None else "disk"
        run.error = f"could not write attention to {where}: {exc.strerror or exc}"
        run.stop_reason = "interrupted"
    finally:
        bar.close()
    return None


def _save(run: Run, reason: str | None, json_path: Path, pngs: bool, companion: bool, html: bool) -> artifacts.Written:
    """Write trace.json and everything beside it; raises OSError (or TraceError) only when trace.json
    itself cannot be written. A recording that was not moved into place is removed whatever happens."""
    trace = run.trace(stop_reason=reason)
    kept, lost, attention = _kept_recorder(run, companion), [], None
    try:
        rec = kept
        if rec is not None and not run.error:
            try:
                rec.finish()
            except OSError as exc:  # the disk filled at the very end, while the header went in
                run.error = f"could not write attention to {json_path.parent}: {exc.strerror or exc}"
        if rec is not None and run.error:
            rec = _after_disk_fault(trace, json_path, rec, lost)
        attention = rec.store() if rec is not None else None
        written = artifacts.write_all(trace, attention, json_path.parent, pngs=pngs, html=html)
    finally:
        if kept is not None and (attention is None or attention.path == kept.writer.path):
            kept.discard()  # not moved into place: nothing names it
    written.failed[:0] = lost
    return written


def _kept_recorder(run: Run, companion: bool) -> AttentionRecorder | None:
    """The run's recorder when its companion is to be saved; otherwise its file is removed now."""
    rec = run.recorder
    if rec is None:
        return None
    if companion and "prompt_bins" in rec.writer.index:
        return rec
    rec.discard()  # --no_companion, or stopped before the prompt was read: nothing to keep
    return None


def _after_disk_fault(
    trace, json_path: Path, rec: AttentionRecorder, lost: list[tuple[str, str]]
) -> AttentionRecorder | None:
    """The companion cut to its last whole row (frees space, writes nothing), then trace.json alone, so
    the steps are safe whatever follows, then the companion's header, in the room reserved for it.

    Returns the recorder when its companion holds exactly the trace's steps; else None, and says why."""
    rec.finished = True
    rows = rec.writer.cut_to_disk()
    try:
        tracefile.save(trace, None, json_path)
    except OSError:
        rec.discard()  # the steps matter more than their attention: make room, try once more
        tracefile.save(trace, None, json_path)  # an OSError here loses the run: the caller says so
        lost.append(("the attention companion", "removed to make room for trace.json on a full disk"))
        return None
    if rows != len(trace.steps):
        rec.discard()
        lost.append(("the attention companion", f"it holds {max(rows, 0)} whole rows of {len(trace.steps)} steps"))
        return None
    try:
        rec.writer.reopen_and_finish()
    except OSError as exc:
        rec.discard()
        lost.append(("the attention companion", exc.strerror or str(exc)))
        return None
    return rec


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
    kept_ok = _replay_kept(lm, trace)
    return 0 if report.ok and kept_ok else 1


def _replay_kept(lm, trace) -> bool:
    """Make each kept 'What if?' result again and print its drift; True when all are reproduced."""
    if not (trace.interventions or trace.sweeps):
        return True
    from .intervene import DRIFT_OK, replay

    rows = replay(lm, trace)
    print(f"kept interventions and sweeps, made again (largest drift of a logit difference; ok up to {DRIFT_OK:g}):")
    for row in rows:
        mark = "ok" if row["drift"] <= DRIFT_OK else "DRIFTED"
        print(f"  {row['kept']:16s} step {row['step']:5d}  {row['what'][:32]:32s}  {row['drift']:.2e}  {mark}")
    return all(row["drift"] <= DRIFT_OK for row in rows)

"""Write a run's shareable artifacts: trace.json (+ attention companion), output.txt and PNG charts.

Every chart is drawn from bounded frames (attnview: at most DEFAULT_BINS cells per axis), so a PNG
costs the same for a 40-token and a 4,000-token prompt. A chart that still cannot be drawn is
reported by name with its reason, never skipped silently. trace.json goes first; a file after it
that cannot be written (a full disk) is reported the same way, and never half written.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import attnview, charts, frames, tracefile
from .attnstore import AttentionStore
from .trace import Trace

log = logging.getLogger(__name__)


@dataclass
class Written:
    paths: list[Path] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (file name, why)


def write_all(
    trace: Trace, attention: AttentionStore | None, out_dir: str | Path, pngs: bool = True, html: bool = False
) -> Written:
    """Write every artifact into out_dir. trace.json first, so nothing after it can block it; raises
    OSError only when trace.json itself cannot be written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = Written()
    try:
        json_path, companion = tracefile.save_pair(trace, attention, out / "trace.json")
    except OSError as exc:
        if attention is None:
            raise
        # the pair did not fit (e.g. a disk that filled while copying): the steps still go, without it
        result.failed.append(("the attention companion", exc.strerror or str(exc)))
        json_path, companion = tracefile.save_pair(trace, None, out / "trace.json")
    result.paths.append(json_path)
    if companion:
        result.paths.append(out / companion)
    _write_text(out / "output.txt", lambda: trace.output_text + "\n", result)
    if html:
        from . import export_html

        _write_text(out / "trace.html", lambda: export_html.build(trace, attention), result)
    if pngs and trace.steps:
        write_pngs(trace, attention, out, result)
    return result


def _write_text(path: Path, text: Callable[[], str], result: Written) -> None:
    """One text artifact, written whole or not at all; a failure is reported by name."""
    try:
        tracefile._atomic_write(path, text().encode("utf-8"))
        result.paths.append(path)
    except OSError as exc:
        result.failed.append((path.name, exc.strerror or str(exc)))


def writable_problem(folder: Path) -> str | None:
    """Why files cannot be written into `folder` (made if missing), or None when they can. Tried by
    writing a file, since permission bits alone say nothing on a read-only mount or for root."""
    if folder.exists() and not folder.is_dir():
        return "is a file, not a folder"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        return f"is not writable ({exc.strerror or exc})"
    return None


def _charts(trace: Trace, attention: AttentionStore | None):
    """(file name, chart builder) for every PNG this run promises."""
    last = trace.steps[-1]
    yield (
        "final_step_token_probs.png",
        lambda: charts.topk_chart(frames.topk_frame(last), f"Top candidates at the final step ({last.step})"),
    )
    yield "timeline.png", lambda: charts.timeline_chart(frames.timeline_frame(trace))
    if attention is None:
        if any(s.attn_snapshot for s in trace.steps):
            yield "attention_snapshots.png", lambda: charts.snapshot_chart(attnview.snapshot_frame(trace))
        return
    layer = attention.layers - 1
    pooled = "" if attention.exact_prompt else f" (pooled: {trace.prompt_len} tokens in {attention.shape.bins} cells)"
    yield (
        "prompt_attention_heatmap.png",
        lambda: charts.heatmap_chart(
            attnview.heatmap_frame(trace, attention, 0, layer, None, _png_window(trace.prompt_len)),
            f"Prompt attention, last layer ({layer}), mean over heads{pooled}",
        ),
    )
    every = trace.attention.snapshot_every if trace.attention else 10
    for s in range(0, len(trace.steps), every) if every > 0 else ():
        yield (
            f"attn_step_{s:04d}.png",
            lambda s=s: charts.heatmap_chart(
                attnview.heatmap_frame(trace, attention, s, layer, None, _png_window(trace.prompt_len + s)),
                [
                    f"Attention seen at step {s}, last layer ({layer}), mean over heads",
                    f"red outline: the row of step {s}'s query",
                ],
            ),
        )


PNG_BINS = 96  # cells per axis in a PNG heatmap: 6 px each at the PNG's size, and a fraction of the drawing time


def _png_window(length: int) -> attnview.Window:
    return attnview.Window.clamp(None, None, length, PNG_BINS)


def write_pngs(trace: Trace, attention: AttentionStore | None, out: Path, result: Written) -> None:
    """The seed's PNGs, drawn by the same Altair builders the app uses (vl-convert renders offline)."""
    for name, build in _charts(trace, attention):
        try:
            build().save(str(out / name), scale_factor=1.5)
            result.paths.append(out / name)
        except Exception as exc:  # noqa: BLE001 - the renderer raises many kinds; each is reported by name
            result.failed.append((name, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"))

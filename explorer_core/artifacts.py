"""Write a run's shareable artifacts: trace.json (+ attention companion), output.txt and PNG charts.

Every chart is drawn from bounded frames (attnview: at most DEFAULT_BINS cells per axis), so a PNG
costs the same for a 40-token and a 4,000-token prompt. A chart that still cannot be drawn is
reported by name with its reason, never skipped silently.
"""

from __future__ import annotations

import logging
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


def write_all(trace: Trace, attention: AttentionStore | None, out_dir: str | Path, pngs: bool = True) -> Written:
    """Write every artifact into out_dir. Trace first, so charts never block it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, companion = tracefile.save_pair(trace, attention, out / "trace.json")
    result = Written([json_path])
    if companion:
        result.paths.append(out / companion)
    text_path = out / "output.txt"
    text_path.write_text(trace.output_text + "\n", encoding="utf-8")
    result.paths.append(text_path)
    if pngs and trace.steps:
        write_pngs(trace, attention, out, result)
    return result


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

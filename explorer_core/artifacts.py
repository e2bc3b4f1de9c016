"""Write a run's shareable artifacts: trace.json (+ attention companion), output.txt and PNG charts."""

from __future__ import annotations

import logging
from pathlib import Path

from . import charts, frames
from . import trace as trace_io
from .trace import AttentionData, Trace

log = logging.getLogger(__name__)


def write_all(trace: Trace, attention: AttentionData | None, out_dir: str | Path, pngs: bool = True) -> list[Path]:
    """Write every artifact into out_dir; return the paths written. Trace first, so charts never block it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [trace_io.save(trace, attention, out / "trace.json")]
    if attention is not None:
        written.append(out / trace_io.companion_name(out / "trace.json"))
    text_path = out / "output.txt"
    text_path.write_text(trace.output_text + "\n", encoding="utf-8")
    written.append(text_path)
    if pngs and trace.steps:
        written += write_pngs(trace, attention, out)
    return written


def write_pngs(trace: Trace, attention: AttentionData | None, out: Path) -> list[Path]:
    """The seed's PNGs, drawn by the same Altair builders the app uses (vl-convert renders offline)."""
    paths = []
    last = trace.steps[-1]
    paths.append(
        _save(
            charts.topk_chart(frames.topk_frame(last), f"Top candidates at the final step ({last.step})"),
            out / "final_step_token_probs.png",
        )
    )
    paths.append(_save(charts.timeline_chart(frames.timeline_frame(trace)), out / "timeline.png"))
    if attention is None:
        if any(s.attn_snapshot for s in trace.steps):
            paths.append(_save(charts.snapshot_chart(frames.snapshot_frame(trace)), out / "attention_snapshots.png"))
        return paths
    layer = attention.prompt.shape[0] - 1
    paths.append(
        _save(
            charts.heatmap_chart(
                frames.prompt_frame(trace, attention, layer, None),
                f"Prompt attention, last layer ({layer}), mean over heads",
            ),
            out / "prompt_attention_heatmap.png",
        )
    )
    every = trace.attention.snapshot_every if trace.attention else 10
    for s in range(0, len(trace.steps), every) if every > 0 else ():  # 0: no snapshots
        chart = charts.heatmap_chart(
            frames.attention_frame(trace, attention, s, layer, None),
            f"Attention at step {s}, last layer ({layer}), mean over heads",
        )
        paths.append(_save(chart, out / f"attn_step_{s:04d}.png"))
    return paths


def _save(chart, path: Path) -> Path:
    chart.save(str(path), scale_factor=1.5)
    return path

"""Per-step time and recorded bytes per step against position, with an Altair chart."""

from __future__ import annotations

from pathlib import Path

import altair as alt
import pandas as pd

from explorer_core.config import GenerationConfig
from explorer_core.models import LoadedModel
from explorer_core.stepper import Run

BYTES_F16 = 2


def run(lm: LoadedModel, n: int = 1024, png: Path | None = None) -> tuple[str, pd.DataFrame]:
    cfg = GenerationConfig(max_new_tokens=n, min_new_tokens=n, block_eos_steps=n, clean_stop=False)
    r = Run(lm, cfg)
    for _ in r:
        pass
    per_head = lm.n_layers * lm.n_heads
    rows = []
    for s in r.steps:
        json_bytes = len(s.model_dump_json())
        attn_bytes = per_head * (r.prompt_len + s.step) * BYTES_F16  # companion row, before compression
        rows.append(
            {
                "position": r.prompt_len + s.step,
                "step ms": s.time_s * 1000,
                "trace.json bytes": json_bytes,
                "attention bytes (float16, raw)": attn_bytes,
            }
        )
    frame = pd.DataFrame(rows)
    frame["bucket"] = (frame["position"] // 64) * 64
    table = frame[frame["position"] >= 64].groupby("bucket").median(numeric_only=True).reset_index()
    lines = [
        "| positions | median step ms | trace.json bytes/step | attention bytes/step (raw float16) |",
        "|---|---|---|---|",
    ]
    for _, row in table.iterrows():
        lines.append(
            f"| {int(row['bucket'])}–{int(row['bucket']) + 63} | {row['step ms']:.1f} | "
            f"{row['trace.json bytes']:.0f} | {row['attention bytes (float16, raw)']:.0f} |"
        )
    if png is not None:
        chart(frame).save(str(png), scale_factor=1.5)
    return "\n".join(lines), frame


def chart(frame: pd.DataFrame) -> alt.VConcatChart:
    base = alt.Chart(frame).encode(x=alt.X("position:Q", title="position in the sequence"))
    time_line = base.mark_point(size=8, opacity=0.5).encode(y=alt.Y("step ms:Q", title="step time (ms)"))
    smooth = base.transform_loess("position", "step ms", bandwidth=0.1).mark_line(color="#d62728").encode(y="step ms:Q")
    long = frame.melt(
        id_vars=["position"],
        value_vars=["trace.json bytes", "attention bytes (float16, raw)"],
        var_name="record",
        value_name="bytes",
    )
    lines = (
        alt.Chart(long)
        .mark_line()
        .encode(
            x=alt.X("position:Q", title="position in the sequence"),
            y=alt.Y("bytes:Q", title="bytes recorded per step"),
            color=alt.Color("record:N", legend=None),
        )
    )
    # each line named at its right end: a concat's shared legend landed on the other chart
    names = lines.transform_window(
        rank="rank()", sort=[alt.SortField("position", order="descending")], groupby=["record"]
    )
    names = names.transform_filter("datum.rank == 1").mark_text(align="right", dx=-4, dy=-8).encode(text="record:N")
    size = lines + names
    return alt.vconcat(
        (time_line + smooth).properties(width=620, height=220, title="Per-step time"),
        size.properties(width=620, height=180, title="Bytes recorded per step"),
    )

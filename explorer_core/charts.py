"""Pure Altair chart builders: tidy DataFrame in, `alt.Chart` out. Shared by the CLI (PNGs) and the app.

Titles and field names are fixed strings; token text appears only as data values.
Token positions sit on ordinal axes whose values are "position: label", sorted by position.
"""

from __future__ import annotations

import altair as alt
import pandas as pd

# The app streams data as Arrow and PNG export inlines it; neither needs Altair's 5000-row guard.
alt.data_transformers.disable_max_rows()

CHOSEN = "#d62728"
OTHER = "#4c78a8"
# The plot keeps its own size and axes, titles and legend go around it. Streamlit's theme fits the
# whole chart into width × height instead, which squashed a plot with a long axis title to a strip.
_PAD = alt.AutoSizeParams(type="pad")


def topk_chart(frame: pd.DataFrame, title: str = "Top candidates", columns: int = 2) -> alt.FacetChart:
    """Raw beside processed top-k bars (or above, with `columns=1`); the chosen token's bar is red.

    Every candidate keeps its axis label: overlap pruning is off and each bar gets a 20 px row.
    """
    base = alt.Chart(frame).encode(
        y=alt.Y(
            "label:N",
            sort=alt.EncodingSortField("rank", op="min", order="ascending"),
            title=None,
            axis=alt.Axis(labelLimit=140, labelOverlap=False, labelFontSize=11),
        ),
        x=alt.X("prob:Q", title="probability", scale=alt.Scale(domain=[0, 1])),
        tooltip=["distribution:N", "rank:O", "label:N", "token_id:Q", alt.Tooltip("prob:Q", format=".4f")],
    )
    bars = base.mark_bar().encode(
        color=alt.condition("datum.chosen", alt.value(CHOSEN), alt.value(OTHER)),
    )
    text = base.mark_text(align="left", dx=3, fontSize=10).encode(text=alt.Text("prob:Q", format=".3f"))
    return (
        alt.layer(bars, text)
        .properties(width=240, height=alt.Step(20))
        .facet(facet=alt.Facet("distribution:N", title=None, sort=["raw model", "after processing"]), columns=columns)
        .resolve_scale(y="independent")
        .properties(title=title)
    )


def timeline_chart(frame: pd.DataFrame, selected: int | None = None, width: int = 640) -> alt.VConcatChart:
    """Chosen-token probability, entropy and rank over steps, one panel each; a rule marks `selected`."""
    panels = []
    for panel, scale in (
        ("probability", alt.Scale(domain=[0, 1])),
        ("entropy (bits)", alt.Scale()),
        ("rank of chosen", alt.Scale(type="log")),
    ):
        sub = frame[frame["panel"] == panel]
        line = (
            alt.Chart(sub)
            .mark_line(point=True)
            .encode(
                x=alt.X("step:Q", title="step", axis=alt.Axis(tickMinStep=1)),
                y=alt.Y("value:Q", title=panel, scale=scale),
                color=alt.Color("series:N", title=None, legend=alt.Legend(orient="bottom", columns=2, labelLimit=0)),
                tooltip=["step:Q", "label:N", "series:N", alt.Tooltip("value:Q", format=".4f")],
            )
        )
        layers = [line]
        if selected is not None:
            rule = alt.Chart(pd.DataFrame({"step": [selected]})).mark_rule(color="gray", strokeDash=[4, 3])
            layers.append(rule.encode(x="step:Q"))
        panels.append(alt.layer(*layers).properties(width=width, height=110))
    return alt.vconcat(*panels).resolve_scale(color="independent").properties(title="Chosen token over the run")


def _weight_color(title: str = "mean weight") -> alt.Color:
    # sqrt: attention is heavy-tailed; on a linear scale a long prompt's weights all look black
    return alt.Color("weight:Q", scale=alt.Scale(scheme="viridis", type="sqrt", zero=True), title=title)


def _weight_stroke() -> alt.Stroke:
    # a field of its own (a copy of weight): sharing the colour's field would merge the two legends
    return alt.Stroke("stroke_w:Q", scale=alt.Scale(scheme="viridis", type="sqrt", zero=True), legend=None)


def heatmap_chart(frame: pd.DataFrame, title: str | list[str], size: int = 420) -> alt.LayerChart:
    """Attention cells (attnview.heatmap_frame): query rows down, key columns across, any cell widths.

    The row of the step's own query (is_step) is outlined in red.
    """
    lo, hi = (int(frame["k0"].min()), int(frame["q1"].max())) if len(frame) else (0, 1)
    x = alt.X(
        "k0:Q",
        title="key position",
        scale=alt.Scale(domain=[lo, hi], nice=False, zero=False),
        axis=alt.Axis(grid=False),
    )
    y = alt.Y(
        "q0:Q",
        title="query position",
        scale=alt.Scale(domain=[lo, hi], nice=False, zero=False, reverse=True),
        axis=alt.Axis(grid=False),
    )
    tooltip = [
        alt.Tooltip("q_name:N", title="query"),
        alt.Tooltip("k_name:N", title="key"),
        alt.Tooltip("weight:Q", format=".4f", title="mean weight"),
    ]
    # a hairline stroke in the cell's own colour closes the anti-aliasing gaps between fractional-width cells
    cells = (
        alt.Chart(frame)
        .transform_calculate(stroke_w="datum.weight")
        .mark_rect(strokeWidth=0.6)
        .encode(x=x, x2="k1:Q", y=y, y2="q1:Q", color=_weight_color(), stroke=_weight_stroke(), tooltip=tooltip)
    )
    step = (
        alt.Chart(frame)
        .transform_filter("datum.is_step")
        .mark_rect(fill=None, stroke=CHOSEN, strokeWidth=1.5)
        .encode(x=x, x2="k1:Q", y=y, y2="q1:Q")
    )
    return alt.layer(cells, step).properties(width=size, height=size, title=title)


def row_chart(frame: pd.DataFrame, title: str, width: int = 520) -> alt.Chart:
    """One query's attention mass per cell of positions (attnview.row_frame), prompt and generated coloured apart."""
    return (
        alt.Chart(frame)
        .mark_rect()
        .encode(
            x=alt.X("k0:Q", title="key position", scale=alt.Scale(nice=False, zero=False)),
            x2="k1:Q",
            y=alt.Y("weight:Q", title="attention mass"),
            y2=alt.datum(0),
            color=alt.Color(
                "part:N", title=None, scale=alt.Scale(domain=["prompt", "generated"], range=[OTHER, CHOSEN])
            ),
            tooltip=[alt.Tooltip("k_name:N", title="positions"), alt.Tooltip("weight:Q", format=".4f", title="mass")],
        )
        .properties(width=width, height=160, title=title, autosize=_PAD)  # Streamlit's fit squashed it to a strip
    )


def heads_grid_chart(frame: pd.DataFrame, title: str, columns: int = 4, size: int = 150) -> alt.FacetChart:
    """Small multiples: one lower-triangle heatmap per head of a layer (attnview.heads_frame)."""
    lo, hi = (int(frame["k0"].min()), int(frame["q1"].max())) if len(frame) else (0, 1)
    scale = alt.Scale(domain=[lo, hi], nice=False, zero=False)
    return (
        alt.Chart(frame)
        .mark_rect()
        .encode(
            x=alt.X("k0:Q", title=None, scale=scale, axis=alt.Axis(tickCount=3)),
            x2="k1:Q",
            y=alt.Y(
                "q0:Q",
                title=None,
                scale=alt.Scale(domain=[lo, hi], nice=False, zero=False, reverse=True),
                axis=alt.Axis(tickCount=3),
            ),
            y2="q1:Q",
            color=_weight_color(),
            tooltip=["head:Q", "q_name:N", "k_name:N", alt.Tooltip("weight:Q", format=".4f")],
        )
        .properties(width=size, height=size)
        .facet(facet=alt.Facet("head:O", title="head"), columns=columns)
        .properties(title=title)
    )


def snapshot_chart(frame: pd.DataFrame, title: str = "Last-layer attention snapshots (mean over heads)") -> alt.Chart:
    """Snapshot rows from trace.json (attnview.snapshot_frame): one row per snapshot step."""
    return (
        alt.Chart(frame)
        .mark_rect()
        .encode(
            x=alt.X("k0:Q", title="key position", scale=alt.Scale(nice=False, zero=False)),
            x2="k1:Q",
            y=alt.Y("step:O", title="step"),
            color=_weight_color(),
            tooltip=[
                "step:Q",
                "label:N",
                alt.Tooltip("k_name:N", title="positions"),
                alt.Tooltip("weight:Q", format=".4f"),
            ],
        )
        .properties(width=520, height=alt.Step(12), title=title)
    )


def divergence_chart(
    frame: pd.DataFrame, first_diff: int | None = None, title: str = "How far model B is from model A, per step"
) -> alt.LayerChart:
    """Divergences (KL, JS) per step between two runs' next-token distributions."""
    line = (
        alt.Chart(frame)
        .mark_line(point=True)
        .encode(
            x=alt.X("step:Q", title="step (model A's tokens)"),
            y=alt.Y("value:Q", title="divergence (bits)"),
            color=alt.Color("measure:N", title=None),
            tooltip=["step:Q", "label:N", "measure:N", alt.Tooltip("value:Q", format=".4f")],
        )
    )
    layers = [line]
    if first_diff is not None:
        rule = alt.Chart(pd.DataFrame({"step": [first_diff]})).mark_rule(color=CHOSEN, strokeDash=[4, 3])
        layers.append(rule.encode(x="step:Q"))
    return alt.layer(*layers).properties(width=640, height=220, title=title)


def stage_chart(frame: pd.DataFrame, title: str = "Each candidate through the processing chain") -> alt.LayerChart:
    """Probability of each tracked candidate after every stage, in chain order; the chosen token is thick."""
    x = alt.X(
        "stage:N",
        sort=alt.EncodingSortField("stage_index", op="min", order="ascending"),
        title="after stage",
        axis=alt.Axis(labelAngle=-30, labelOverlap=False),
    )
    lines = (
        alt.Chart(frame)
        .mark_line(point=True)
        .encode(
            x=x,
            y=alt.Y("prob:Q", title="probability", scale=alt.Scale(domain=[0, 1])),
            color=alt.Color(
                "label:N",
                title="candidate",
                sort=alt.EncodingSortField("prob", op="max", order="descending"),
                # at the side, one entry a row, nothing cut: a legend below takes its rows out of the
                # plot's own height when Streamlit fits the chart (the plot was squashed to a strip)
                legend=alt.Legend(labelLimit=0, symbolLimit=0),
            ),
            strokeWidth=alt.condition("datum.chosen", alt.value(4), alt.value(1.5)),
            tooltip=["stage:N", "label:N", "token_id:Q", alt.Tooltip("prob:Q", format=".4f")],
        )
    )
    return lines.properties(width=520, height=260, title=title, autosize=_PAD)


def lens_grid_chart(frame: pd.DataFrame, title: str = "Logit lens: each layer's top token") -> alt.LayerChart:
    """Layers (rows) by steps (columns), coloured by the top token's probability, labelled with the token."""
    base = alt.Chart(frame).encode(
        x=alt.X("step:O", title="step"),
        y=alt.Y("layer:O", title="layer", sort="descending"),
        tooltip=[
            "step:Q",
            "layer:Q",
            "top:N",
            alt.Tooltip("p_top:Q", format=".3f"),
            "chosen:N",
            alt.Tooltip("p_chosen:Q", format=".3f"),
        ],
    )
    rect = base.mark_rect().encode(
        color=alt.Color("p_top:Q", scale=alt.Scale(scheme="blues", domain=[0, 1]), title="p(top)")
    )
    text = base.mark_text(fontSize=8, limit=40).encode(
        text="top:N", color=alt.condition("datum.p_top > 0.6", alt.value("white"), alt.value("black"))
    )
    return alt.layer(rect, text).properties(width=alt.Step(42), height=alt.Step(14), title=title)


def lens_step_chart(frame: pd.DataFrame, title: str) -> alt.Chart:
    """Per layer, the probability the lens gives the token finally chosen."""
    return (
        alt.Chart(frame)
        .mark_line(point=True)
        .encode(
            x=alt.X("layer:Q", title="layer"),
            y=alt.Y("p_chosen:Q", title="p(chosen token)", scale=alt.Scale(domain=[0, 1])),
            tooltip=["layer:Q", alt.Tooltip("p_chosen:Q", format=".4f"), "top:N", alt.Tooltip("p_top:Q", format=".3f")],
        )
        .properties(width=420, height=200, title=title)
    )


def replay_chart(frame: pd.DataFrame) -> alt.Chart:
    """Largest difference per step between recorded and recomputed probabilities."""
    long = frame.melt(
        id_vars=["step", "label"],
        value_vars=["max_diff_raw", "max_diff_proc"],
        var_name="distribution",
        value_name="difference",
    )
    long["difference"] = long["difference"].clip(lower=1e-12)
    return (
        alt.Chart(long)
        .mark_line(point=True)
        .encode(
            x=alt.X("step:Q"),
            y=alt.Y("difference:Q", scale=alt.Scale(type="log"), title="largest |recorded - recomputed|"),
            color=alt.Color("distribution:N", title=None),
            tooltip=["step:Q", "label:N", "distribution:N", alt.Tooltip("difference:Q", format=".2e")],
        )
        .properties(
            width=640, height=200, title="Replay check: recorded against recomputed probabilities", autosize=_PAD
        )
    )


def uncertainty_chart(frame: pd.DataFrame, selected: int | None = None, width: int = 640) -> alt.VConcatChart:
    """Entropy, varentropy, surprisal and top-two margin per step; torn steps are red points."""
    panels = []
    for field, title in (
        ("entropy", "entropy (bits)"),
        ("varentropy", "varentropy (bits²)"),
        ("surprisal", "surprisal (bits)"),
        ("margin", "top-two margin"),
    ):
        base = alt.Chart(frame).encode(
            x=alt.X("step:Q", title="step", axis=alt.Axis(tickMinStep=1)),
            y=alt.Y(f"{field}:Q", title=title),
            tooltip=["step:Q", "label:N", alt.Tooltip(f"{field}:Q", format=".3f"), "torn:N"],
        )
        layers = [
            base.mark_line(color=OTHER),
            base.mark_point(filled=True, size=40).encode(
                color=alt.condition("datum.torn", alt.value(CHOSEN), alt.value(OTHER))
            ),
        ]
        if selected is not None:
            rule = alt.Chart(pd.DataFrame({"step": [selected]})).mark_rule(color="gray", strokeDash=[4, 3])
            layers.append(rule.encode(x="step:Q"))
        panels.append(alt.layer(*layers).properties(width=width, height=80))
    return alt.vconcat(*panels).properties(title="Uncertainty per step (red: torn)")


def components_chart(frame: pd.DataFrame, title: str) -> alt.Chart:
    """Layers x heads heatmap with an MLP column: each part's direct share of the logit difference."""
    limit = float(frame["value"].abs().max()) if len(frame) else 1.0
    return (
        alt.Chart(frame)
        .mark_rect()
        .encode(
            x=alt.X("column:O", sort=alt.EncodingSortField("order", op="min", order="ascending"), title=None),
            y=alt.Y("layer:O", title="layer", sort="descending"),
            color=alt.Color(
                "value:Q",
                scale=alt.Scale(scheme="redblue", reverse=True, domain=[-limit, limit]),
                title="logit diff",
            ),
            tooltip=["layer:Q", "column:N", alt.Tooltip("value:Q", format=".4f")],
        )
        .properties(width=alt.Step(22), height=alt.Step(12), title=title)
    )


def attribution_chart(frame: pd.DataFrame, top: int = 15, title: str = "Top positions") -> alt.FacetChart:
    """Per method, the `top` positions with the largest absolute score; red pushes for the chosen token."""
    sub = frame[frame["rank"] <= top]
    return (
        alt.Chart(sub)
        .mark_bar()
        .encode(
            # Streamlit's theme hides overlapping labels, which dropped every other position's name:
            # rows tall enough for its label font, and every label drawn
            y=alt.Y(
                "name:N",
                sort=alt.EncodingSortField("rank", op="min", order="ascending"),
                title=None,
                axis=alt.Axis(labelOverlap=False),
            ),
            x=alt.X("score:Q", title="score"),
            color=alt.condition("datum.score > 0", alt.value(CHOSEN), alt.value(OTHER)),
            tooltip=["method:N", "position:Q", "label:N", alt.Tooltip("score:Q", format=".4f")],
        )
        .properties(width=260, height=alt.Step(18))
        .facet(column=alt.Column("method_name:N", title=None, sort=list(dict.fromkeys(sub["method_name"]))))
        .resolve_scale(y="independent", x="independent")
        .properties(title=title)
    )

"""Pure Altair chart builders: tidy DataFrame in, `alt.Chart` out. Shared by the CLI (PNGs) and the app.

Titles and field names are fixed strings; token text appears only as data values.
Token positions sit on ordinal axes whose values are "position: label", sorted by position.
"""

from __future__ import annotations

import json
import math

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
    return (
        _topk_layers(frame)
        .properties(width=240, height=alt.Step(20))
        .facet(facet=alt.Facet("distribution:N", title=None, sort=["raw model", "after processing"]), columns=columns)
        .resolve_scale(y="independent")
        .properties(title=title)
    )


def topk_panel(frame: pd.DataFrame, distribution: str, width: int | str = "container") -> alt.LayerChart:
    """One distribution's top-k bars as a chart of its own, which can take its column's width (the app
    puts raw and processed in two columns; a phone stacks them): a facet keeps a fixed panel width."""
    title = f"Top candidates: {distribution}"
    return sized(_topk_layers(frame[frame["distribution"] == distribution]), width, alt.Step(20), title)


def _topk_layers(frame: pd.DataFrame) -> alt.LayerChart:
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
    return alt.layer(bars, text)


RAW_COLOR, PROCESSED_COLOR = "#83c9ff", "#0068c9"  # the app's light and dark blue: raw, processed


def timeline_chart(frame: pd.DataFrame, selected: int | None = None, width: int | str = 640) -> alt.VConcatChart:
    """Chosen-token probability, entropy and rank over steps, one panel each; a rule marks `selected`.
    width="container": each panel takes the app's column (checked in Chromium at 390 px)."""
    panels = []
    for panel, scale in (
        ("probability", alt.Scale(domain=[0, 1])),
        ("entropy (bits)", alt.Scale()),
        ("rank of chosen", alt.Scale(type="log")),
    ):
        sub = frame[frame["panel"] == panel]
        names = sorted(sub["series"].unique())
        # explicit colours: raw light, processed dark, the same in the app (whose theme would recolour
        # default ones) and in the export and PNGs
        tones = [PROCESSED_COLOR if "processed" in n else RAW_COLOR for n in names]
        line = (
            alt.Chart(sub)
            .mark_line(point=True)
            .encode(
                x=_step_x(frame),
                y=alt.Y("value:Q", title=panel, scale=scale),
                color=alt.Color(
                    "series:N",
                    title=None,
                    scale=alt.Scale(domain=names, range=tones),
                    # one per line in a column's width: two side by side ran past a phone's screen
                    legend=alt.Legend(orient="bottom", columns=1 if width == "container" else 2, labelLimit=0),
                ),
                tooltip=["step:Q", "label:N", "series:N", alt.Tooltip("value:Q", format=".4f")],
            )
        )
        layers = [line]
        if selected is not None:
            rule = alt.Chart(pd.DataFrame({"step": [selected]})).mark_rule(color="gray", strokeDash=[4, 3])
            layers.append(rule.encode(x="step:Q"))
        panels.append(alt.layer(*layers).properties(width=width, height=110))
    chart = alt.vconcat(*panels).resolve_scale(color="independent")
    return _fit_concat(chart, width).properties(title="Chosen token over the run")


COMMIT_KINDS = {  # legend entry of each mark: a colour and a shape apiece, none repeated
    "commit": ("the lens's top from this layer on", OTHER, "square"),
    "never": ("never the lens's top at the last layer", "#9e9e9e", "square"),
    "rules": ("chosen by the sampling rules (raw rank > 1)", CHOSEN, "triangle-up"),
}


def commitment_chart(
    frame: pd.DataFrame, selected: int | None = None, width: int | str = "container"
) -> alt.LayerChart:
    """Per step (frames.commitment_frame), a bar up to the layer from which the chosen token stayed the
    lens's top; a grey square in a "never" row above the top layer when it never did; a red triangle in
    that row where the sampling rules, not the model, chose the token. Steps without a lens draw nothing."""
    top = int(frame["n_layers"].max()) if len(frame) else 1  # the "never" row: one above the last layer
    steps = int(frame["step"].max() - frame["step"].min()) + 1 if len(frame) else 1
    y = alt.Y(
        "y:Q",
        title=f"layer (0–{top - 1})",
        scale=alt.Scale(domain=[-0.5, top + 0.5], nice=False, zero=False),
        # no tick at the last layer: its label and "never" one row above it would overlap (the title
        # names the last layer instead)
        axis=alt.Axis(
            values=sorted({0, (top - 1) // 2, top}),
            labelExpr=f"datum.value == {top} ? 'never' : datum.value",
            grid=False,
        ),
    )
    tooltip = [
        "step:Q",
        alt.Tooltip("label:N", title="token"),
        alt.Tooltip("commit_text:N", title="commit layer"),
        alt.Tooltip("rank_raw:Q", title="raw rank"),
    ]
    # no padding: bars pad a linear scale by 5 px, which ran the axis past the last step
    base = alt.Chart().encode(x=_step_x(frame, padding=0), tooltip=tooltip)  # the frame goes in once, below
    columns = 1 if isinstance(width, str) else 3  # a column's width (a phone) takes one entry a line
    # marks sized to a step, whatever the width and the run's length: on a phone, fixed-size triangles
    # ran into each other
    bar_width = alt.ExprRef(f"clamp(0.8 * width / {steps}, 1, 14)")
    area = f"pow(0.9 * width / {steps}, 2)"  # a point's size is its area
    bars = _commit_kind(base, "isValid(datum.commit)", "commit", "datum.commit + 0.5", columns)
    never = _commit_kind(base, "datum.has_lens && !isValid(datum.commit)", "never", str(top), columns)
    rules = _commit_kind(base, "datum.rules_chose", "rules", str(top), columns)
    layers = [
        bars.mark_bar(width=bar_width).encode(y=y, y2="y0:Q"),
        never.mark_point(filled=True, size=alt.ExprRef(f"clamp({area} / 3, 6, 30)"), opacity=1).encode(
            y=y, shape=_commit_shape()
        ),
        # an outline around the grey square: a step can be both, and both stay visible
        rules.mark_point(filled=False, size=alt.ExprRef(f"clamp({area}, 18, 90)"), strokeWidth=1.5, opacity=1).encode(
            y=y, shape=_commit_shape()
        ),
    ]
    if selected is not None:
        rule = alt.Chart(pd.DataFrame({"step": [selected]})).mark_rule(color="gray", strokeDash=[4, 3])
        layers.append(rule.encode(x="step:Q"))
    title = ["Commitment: the layer from which", "each token stays the lens's top"]  # short lines: a phone
    return sized(alt.layer(*layers, data=frame), width, 100, title)


def _commit_kind(base: alt.Chart, keep: str, kind: str, y_expr: str, columns: int) -> alt.Chart:
    """The steps `keep` selects, coloured as `kind`'s legend entry, their mark's top at `y_expr` (a bar
    starts below layer 0). Colour and shape share field, domain and title: Vega-Lite draws one legend."""
    names, colours = [v[0] for v in COMMIT_KINDS.values()], [v[1] for v in COMMIT_KINDS.values()]
    color = alt.Color(
        "kind:N",
        title=None,
        scale=alt.Scale(domain=names, range=colours),
        legend=alt.Legend(orient="bottom", columns=columns, labelLimit=0),
    )
    chart = base.transform_filter(keep).transform_calculate(kind=json.dumps(COMMIT_KINDS[kind][0]), y=y_expr, y0="-0.5")
    return chart.encode(color=color)


def _commit_shape() -> alt.Shape:
    names, shapes = [v[0] for v in COMMIT_KINDS.values()], [v[2] for v in COMMIT_KINDS.values()]
    return alt.Shape("kind:N", title=None, scale=alt.Scale(domain=names, range=shapes))


def _weight_color(frame: pd.DataFrame, title: str = "mean weight") -> alt.Color:
    """sqrt: attention is heavy-tailed; on a linear scale a long prompt's weights all look black.
    Below the plot, horizontal, three labels (0, the middle of the ramp, the largest weight): a side
    legend took a phone's width and the default sqrt ticks crowded at the top end."""
    top = float(frame["weight"].max()) if len(frame) else 1.0
    top = top if top > 0 else 1.0
    legend = alt.Legend(
        orient="bottom", direction="horizontal", values=[0, top / 4, top], format=".2~f", gradientLength=160
    )
    return alt.Color("weight:Q", scale=alt.Scale(scheme="viridis", type="sqrt", zero=True), title=title, legend=legend)


def _weight_stroke() -> alt.Stroke:
    # a field of its own (a copy of weight): sharing the colour's field would merge the two legends
    return alt.Stroke("stroke_w:Q", scale=alt.Scale(scheme="viridis", type="sqrt", zero=True), legend=None)


AXIS_LABEL_MAX = 32  # positions per axis up to which each position's token is written on the axis
_FIT_X = alt.AutoSizeParams(type="fit-x", contains="padding")


def sized(chart, width: int | str, height: int | alt.Step, title: str | list[str]):
    """Give a chart its size and title. width="container" (the app): the chart takes the width Streamlit
    gives it (pass width="stretch" to st.altair_chart) and only the width is fitted, so a phone gets a
    narrower plot and the height stays as asked; a number (PNG, HTML export) keeps the plot that wide.

    In a fitted chart each title line is cut at the plot's width: a title line wider than the column
    made the fit shrink the plot to a 2 px strip. Keep lines short (a list of lines) so nothing is cut."""
    if isinstance(width, str) and width == "container":
        title = alt.TitleParams(text=title, limit=alt.ExprRef("width"))
        return chart.properties(width=width, height=height, autosize=_FIT_X, title=title)
    return chart.properties(width=width, height=height, autosize=_PAD, title=title)


def _fit_concat(chart, width: int | str):
    """A stack of panels each width="container": only the width is fitted, as `sized` does."""
    return chart.properties(autosize=_FIT_X) if isinstance(width, str) and width == "container" else chart


def _position_axis(frame: pd.DataFrame, lo: int, hi: int, **extra) -> alt.Axis:
    """Integer positions on an axis (never 2.5); with few single-position cells, each cell's token
    written at its centre as "position token" (the token also stays in the tooltip)."""
    cells = frame.drop_duplicates("k0")
    if hi - lo <= AXIS_LABEL_MAX and len(cells) == hi - lo and (cells["k1"] - cells["k0"] == 1).all():
        names = dict(zip(cells["k0"].astype(int), cells["k_name"]))
        labels = [names.get(p, str(p)).replace(": ", " ", 1) for p in range(lo, hi)]
        return alt.Axis(
            grid=False,
            values=[p + 0.5 for p in range(lo, hi)],
            labelExpr=f"{json.dumps(labels)}[floor(datum.value) - {lo}]",  # a string literal: json escapes it
            labelLimit=90,
            labelOverlap=False,
            **extra,
        )
    return alt.Axis(grid=False, tickMinStep=1, format="d", **extra)


def heatmap_chart(
    frame: pd.DataFrame, title: str | list[str], size: int = 420, width: int | str | None = None
) -> alt.LayerChart:
    """Attention cells (attnview.heatmap_frame): query rows down, key columns across, any cell widths.

    The row of the step's own query (is_step) is outlined in red. `size` is the plot's height (and its
    width unless `width` is given: "container" fits the app's column, see `sized`).
    """
    lo, hi = (int(frame["k0"].min()), int(frame["q1"].max())) if len(frame) else (0, 1)
    x = alt.X(
        "k0:Q",
        title="key position",
        scale=alt.Scale(domain=[lo, hi], nice=False, zero=False),
        axis=_position_axis(frame, lo, hi, labelAngle=-90),
    )
    y = alt.Y(
        "q0:Q",
        title="query position",
        scale=alt.Scale(domain=[lo, hi], nice=False, zero=False, reverse=True),
        axis=_position_axis(frame, lo, hi),
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
        .encode(x=x, x2="k1:Q", y=y, y2="q1:Q", color=_weight_color(frame), stroke=_weight_stroke(), tooltip=tooltip)
    )
    step = (
        alt.Chart(frame)
        .transform_filter("datum.is_step")
        .mark_rect(fill=None, stroke=CHOSEN, strokeWidth=1.5)
        .encode(x=x, x2="k1:Q", y=y, y2="q1:Q")
    )
    return sized(alt.layer(cells, step), size if width is None else width, size, title)


def row_chart(frame: pd.DataFrame, title: str, width: int | str = 520) -> alt.Chart:
    """One query's attention mass per cell of positions (attnview.row_frame), prompt and generated coloured apart."""
    lo, hi = (int(frame["k0"].min()), int(frame["k1"].max())) if len(frame) else (0, 1)
    chart = (
        alt.Chart(frame)
        .mark_rect()
        .encode(
            x=alt.X(
                "k0:Q",
                title="key position",
                scale=alt.Scale(domain=[lo, hi], nice=False, zero=False),
                axis=alt.Axis(tickMinStep=1, format="d"),
            ),
            x2="k1:Q",
            y=alt.Y("weight:Q", title="attention mass"),
            y2=alt.datum(0),
            color=alt.Color(
                "part:N",
                title=None,
                scale=alt.Scale(domain=["prompt", "generated"], range=[OTHER, CHOSEN]),
                legend=alt.Legend(orient="top"),  # above the plot: a side legend takes a phone's width
            ),
            tooltip=[alt.Tooltip("k_name:N", title="positions"), alt.Tooltip("weight:Q", format=".4f", title="mass")],
        )
    )
    return sized(chart, width, 160, title)  # Streamlit's fit squashed it to a strip


def heads_grid_chart(frame: pd.DataFrame, title: str, columns: int = 3, size: int = 100) -> alt.FacetChart:
    """Small multiples: one lower-triangle heatmap per head of a layer (attnview.heads_frame).

    A facet cannot take its container's width, so it is sized for a phone: 3 × 100 px plus one axis
    and the gaps is about 350 px, inside a 390 px screen's column."""
    lo, hi = (int(frame["k0"].min()), int(frame["q1"].max())) if len(frame) else (0, 1)
    axis = alt.Axis(tickCount=3, tickMinStep=1, format="d", grid=False)
    return (
        alt.Chart(frame)
        .mark_rect()
        .encode(
            x=alt.X("k0:Q", title=None, scale=alt.Scale(domain=[lo, hi], nice=False, zero=False), axis=axis),
            x2="k1:Q",
            y=alt.Y(
                "q0:Q",
                title=None,
                scale=alt.Scale(domain=[lo, hi], nice=False, zero=False, reverse=True),
                axis=axis,
            ),
            y2="q1:Q",
            color=_weight_color(frame),
            tooltip=["head:Q", "q_name:N", "k_name:N", alt.Tooltip("weight:Q", format=".4f")],
        )
        .properties(width=size, height=size)
        .facet(facet=alt.Facet("head:O", title="head"), columns=columns, spacing=8)
        .properties(title=title)
    )


def snapshot_chart(
    frame: pd.DataFrame, title: str = "Last-layer attention snapshots (mean over heads)", width: int | str = 520
) -> alt.Chart:
    """Snapshot rows from trace.json (attnview.snapshot_frame): one row per snapshot step."""
    chart = (
        alt.Chart(frame)
        .mark_rect()
        .encode(
            x=alt.X(
                "k0:Q",
                title="key position",
                scale=alt.Scale(nice=False, zero=False),
                axis=alt.Axis(tickMinStep=1, format="d"),
            ),
            x2="k1:Q",
            y=alt.Y("step:O", title="step"),
            color=_weight_color(frame),
            tooltip=[
                "step:Q",
                "label:N",
                alt.Tooltip("k_name:N", title="positions"),
                alt.Tooltip("weight:Q", format=".4f"),
            ],
        )
    )
    return sized(chart, width, alt.Step(12), title)


def divergence_chart(
    frame: pd.DataFrame,
    first_diff: int | None = None,
    title: str = "How far model B is from model A, per step",
    width: int | str = "container",  # the Compare page's column (st.altair_chart's default is "stretch")
) -> alt.LayerChart:
    """Divergences (KL, JS) per step between two runs' next-token distributions."""
    line = (
        alt.Chart(frame)
        .mark_line(point=True)
        .encode(
            x=_step_x(frame, "step (model A's tokens)"),
            y=alt.Y("value:Q", title="divergence (bits)"),
            color=alt.Color("measure:N", title=None),
            tooltip=["step:Q", "label:N", "measure:N", alt.Tooltip("value:Q", format=".4f")],
        )
    )
    layers = [line]
    if first_diff is not None:
        rule = alt.Chart(pd.DataFrame({"step": [first_diff]})).mark_rule(color=CHOSEN, strokeDash=[4, 3])
        layers.append(rule.encode(x="step:Q"))
    return sized(alt.layer(*layers), width, 220, title)


# Tableau 20, dark then light of each hue: 20 colours no two alike (category10 repeats from the 11th)
_TABLEAU20 = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5",
]  # fmt: skip


def distinct_colors(n: int) -> list[str]:
    """n colours, none repeated: Tableau 20, then hues spaced by the golden angle at three lightnesses."""
    extra = [f"hsl({(i * 137.508) % 360:.0f}, 65%, {(45, 30, 62)[i % 3]}%)" for i in range(max(0, n - 20))]
    return (_TABLEAU20 + extra)[:n]


def _step_x(frame: pd.DataFrame, title: str = "step", **scale) -> alt.X:
    """Steps as integers, the axis ending at the last step (a nice domain ran past it); `scale`: more
    properties of the scale."""
    steps = frame["step"] if len(frame) else pd.Series([0])
    lo, hi = int(steps.min()), int(steps.max())
    return alt.X(
        "step:Q",
        title=title,
        scale=alt.Scale(domain=[lo, max(hi, lo + 1)], nice=False, zero=False, **scale),
        axis=alt.Axis(tickMinStep=1, format="d"),
    )


def stage_chart(
    frame: pd.DataFrame, title: str = "Each candidate through the processing chain", width: int | str = 520
) -> alt.Chart:
    """Probability of each tracked candidate after every stage, in chain order; the chosen token is thick."""
    x = alt.X(
        "stage:N",
        sort=alt.EncodingSortField("stage_index", op="min", order="ascending"),
        title="after stage",
        axis=alt.Axis(labelAngle=-30, labelOverlap=False),
    )
    order = list(frame.groupby("label", sort=False)["prob"].max().sort_values(ascending=False).index)
    lines = (
        alt.Chart(frame)
        .mark_line(point=True)
        .encode(
            x=x,
            y=alt.Y("prob:Q", title="probability", scale=alt.Scale(domain=[0, 1])),
            color=alt.Color(
                "label:N",
                title="candidate",
                # an explicit domain and as many colours as candidates: no two candidates look alike
                scale=alt.Scale(domain=order, range=distinct_colors(len(order))),
                # below, two columns, nothing dropped: a side legend took a phone's width; below is safe
                # because only the width is fitted (`sized`), the plot keeps its height
                legend=alt.Legend(orient="bottom", columns=2, labelLimit=160, symbolLimit=0),
            ),
            strokeWidth=alt.condition("datum.chosen", alt.value(4), alt.value(1.5)),
            tooltip=["stage:N", "label:N", "token_id:Q", alt.Tooltip("prob:Q", format=".4f")],
        )
    )
    return sized(lines, width, 260, title)


def lens_grid_chart(
    frame: pd.DataFrame, title: str = "Logit lens: each layer's top token", width: int | str | None = None
) -> alt.LayerChart:
    """Layers (rows) by steps (columns), coloured by the top token's probability, labelled with the token
    (cut to the column's width: "container" narrows the columns on a phone, the tooltip has it whole)."""
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
        color=alt.Color(
            "p_top:Q",
            # from a light grey-blue, not white: the palest cells stay visible on the dark theme's background
            scale=alt.Scale(scheme="blues", domain=[0, 1], range=["#c6d4e1", "#08306b"]),
            title="p(top)",
            legend=alt.Legend(tickCount=3, format=".1f"),
        ),
        stroke=alt.value("#8a8a8a"),
        strokeWidth=alt.value(0.5),
    )
    # the text's colour follows the cell's darkness (blues is dark past about 0.5), on light and dark themes
    text = base.mark_text(fontSize=11, limit=alt.ExprRef("bandwidth('x') - 4")).encode(
        text="top:N", color=alt.condition("datum.p_top > 0.5", alt.value("white"), alt.value("#1a1a1a"))
    )
    width = alt.Step(56) if width is None else width  # None: a 56 px column a step (PNG export)
    return sized(alt.layer(rect, text), width, alt.Step(20), title)


def lens_step_chart(frame: pd.DataFrame, title: str, width: int | str = 420) -> alt.Chart:
    """Per layer, the probability the lens gives the token finally chosen."""
    chart = (
        alt.Chart(frame)
        .mark_line(point=True)
        .encode(
            x=alt.X("layer:Q", title="layer", scale=alt.Scale(nice=False), axis=alt.Axis(tickMinStep=1, format="d")),
            y=alt.Y("p_chosen:Q", title="p(chosen token)", scale=alt.Scale(domain=[0, 1])),
            tooltip=["layer:Q", alt.Tooltip("p_chosen:Q", format=".4f"), "top:N", alt.Tooltip("p_top:Q", format=".3f")],
        )
    )
    return sized(chart, width, 200, title)


def _decades(values: pd.Series) -> list[float]:
    """Powers of ten spanning the values: a log axis's only ticks (its minor ticks crowded the labels)."""
    lo, hi = (float(values.min()), float(values.max())) if len(values) else (1e-12, 1.0)
    return [10.0**k for k in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)]


REPLAY_NAMES = {"max_diff_raw": "raw model", "max_diff_proc": "after processing"}


def replay_chart(frame: pd.DataFrame, width: int | str = 640) -> alt.Chart:
    """Largest difference per step between recorded and recomputed probabilities."""
    long = frame.melt(
        id_vars=["step", "label"],
        value_vars=["max_diff_raw", "max_diff_proc"],
        var_name="distribution",
        value_name="difference",
    )
    long["difference"] = long["difference"].clip(lower=1e-12)
    long["distribution"] = long["distribution"].map(REPLAY_NAMES)
    chart = (
        alt.Chart(long)
        .mark_line(point=True)
        .encode(
            x=_step_x(long),
            # one notation for every tick (the default mixed 0.0001 with 1e-7)
            y=alt.Y(
                "difference:Q",
                scale=alt.Scale(type="log"),
                title="largest |recorded - recomputed|",
                axis=alt.Axis(format=".0e", values=_decades(long["difference"])),
            ),
            color=alt.Color(
                "distribution:N",
                title=None,
                scale=alt.Scale(domain=list(REPLAY_NAMES.values()), range=[OTHER, CHOSEN]),
                legend=alt.Legend(orient="top"),
            ),
            tooltip=["step:Q", "label:N", "distribution:N", alt.Tooltip("difference:Q", format=".2e")],
        )
    )
    title = ["Replay check: recorded", "against recomputed probabilities"]  # two short lines: fits a phone
    return sized(chart, width, 200, title)


def uncertainty_chart(frame: pd.DataFrame, selected: int | None = None, width: int | str = 640) -> alt.VConcatChart:
    """Entropy, varentropy, surprisal and top-two margin per step; torn steps are red points."""
    panels = []
    for field, title in (
        ("entropy", "entropy (bits)"),
        ("varentropy", "varentropy (bits²)"),
        ("surprisal", "surprisal (bits)"),
        ("margin", "top-two margin"),
    ):
        base = alt.Chart(frame).encode(
            x=_step_x(frame),
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
    return _fit_concat(alt.vconcat(*panels), width).properties(title="Uncertainty per step (red: torn)")


def components_chart(frame: pd.DataFrame, title: str, limit: float | None = None) -> alt.Chart:
    """Layers x heads heatmap with an MLP column: each part's direct share of the logit difference.

    `limit`: the colour scale's end (default: this frame's largest magnitude); two heatmaps drawn side by
    side share one, so equal colours mean equal logits."""
    if limit is None:
        limit = float(frame["value"].abs().max()) if len(frame) else 1.0
    limit = limit or 1.0
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

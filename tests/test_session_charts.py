"""Attention views as a new user met them: exact prompt rows across prefill chunks, a failing recompute
that keeps the page, chart specs that fit a phone's width, integer axes, distinct legend colours."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from explorer_core import attnview, capture, charts, fidelity, recompute
from explorer_core.config import GenerationConfig
from explorer_core.limits import Limits
from explorer_core.stepper import Run
from tests.apphelp import chart_titles
from tests.apphelp import charts as chart_specs
from tests.tiny import CORPUS, eager_attentions

SMALL_CHUNK = 4 * 4 * 40 * 64  # 4 heads × 64 keys: a prefill of a few hundred tokens comes in many chunks


@pytest.fixture()
def small_chunks(monkeypatch):
    monkeypatch.setattr(capture, "CHUNK_BYTES", SMALL_CHUNK)


@pytest.fixture(scope="module")
def pooled_run(tiny_llama):
    """A ~370-token prompt whose own attention is stored pooled (the 1 MiB budget holds 256 cells per
    axis), so the attention tab offers the exact recompute; and the eager reference of its prompt."""
    prompt = " ".join(CORPUS[:9])
    config = GenerationConfig(model="x", prompt=prompt, chat=False, max_new_tokens=3, min_new_tokens=3)
    run = Run(tiny_llama, config, Limits(prompt_attention_mb=1))
    for _ in run:
        pass
    assert not run.attention().exact_prompt, "the prompt must be pooled for the recompute to be offered"
    return run, eager_attentions(tiny_llama, run.ids[:, : run.prompt_len])


@pytest.mark.parametrize("way", ["own", "fast"])
def test_recomputed_rows_spanning_chunks_equal_eager(tiny_llama, pooled_run, small_chunks, monkeypatch, way):
    """The user's case: a window crossing prefill chunks of different key widths (it used to crash)."""
    monkeypatch.setattr(fidelity, "way_of", lambda lm: way)
    run, want = pooled_run
    ids, t = run.ids[0, : run.prompt_len].tolist(), run.prompt_len
    for layer, lo, hi in [(1, 0, t), (1, 37, 301), (0, t - 90, t), (1, 5, 6)]:
        rows = recompute.prompt_rows(tiny_llama, ids, layer, lo, hi)
        assert rows.shape == (4, hi - lo, t)
        np.testing.assert_allclose(rows, want[layer, :, lo:hi], atol=1e-5, err_msg=f"layer {layer} rows {lo}..{hi}")


def test_recompute_of_a_layer_without_weights_says_so(tiny_llama, monkeypatch):
    monkeypatch.setattr(recompute, "_only_layer", lambda model, layer, sink: contextlib.nullcontext())
    with pytest.raises(ValueError, match="computes no attention weights: pick an attention layer"):
        recompute.prompt_rows(tiny_llama, [5, 6, 7, 8], 1, 0, 2)


def _attention_tab():
    import streamlit as st

    from explorer_ui.attention_view import render_attention
    from explorer_ui.base import guarded

    trace, store, lm = st.session_state["case"]
    guarded("Attention", render_attention, trace, store, len(trace.steps) - 1, "t", lm)
    st.write("below the attention view")


def _tab(run, lm) -> AppTest:
    at = AppTest.from_function(_attention_tab, default_timeout=120)
    at.session_state["case"] = (run.trace(), run.attention(), lm)
    return at.run()


def test_exact_rows_button_across_chunks_draws_the_true_rows(tiny_llama, pooled_run, small_chunks):
    run, want = pooled_run
    at = _tab(run, tiny_llama)
    at.slider(key="t_range").set_value((100, 139)).run()  # 40 rows, one position per cell
    at.button(key="t_exact_btn").click().run()
    assert not at.exception and not at.error, (at.exception, at.error)
    (cells,) = next(data for spec, data in chart_specs(at) if "layer" in spec)  # the heatmap: a layer chart
    last = run.attention().layers - 1
    row = cells[(cells["q0"] == 120) & (cells["k1"] - cells["k0"] == 1)].sort_values("k0")
    mean = want[last, :, 120, 100:121].mean(axis=0)
    np.testing.assert_allclose(row["weight"].to_numpy(), mean, atol=1e-5)


def test_failing_recompute_shows_an_error_in_place_and_keeps_the_page(tiny_llama, pooled_run, monkeypatch):
    def broken(*args):
        raise RuntimeError("Sizes of tensors must match except in dimension 1")

    monkeypatch.setattr(recompute, "prompt_rows", broken)
    run, _ = pooled_run
    at = _tab(run, tiny_llama)
    at.slider(key="t_range").set_value((100, 139)).run()
    at.button(key="t_exact_btn").click().run()
    assert not at.exception
    assert "could not be recomputed" in at.error[0].value
    assert any("Sizes of tensors" in t.value for t in at.text)
    assert len(chart_specs(at)) == 2  # the row and the pooled heatmap are still drawn
    assert at.markdown[-1].value == "below the attention view"


def _heatmap(run, window=None):
    trace, store = run.trace(), run.attention()
    frame = attnview.heatmap_frame(trace, store, len(trace.steps) - 1, 1, None, window)
    return frame, charts.heatmap_chart(frame, "t", size=340, width="container").to_dict()


def test_app_charts_take_the_container_width_and_stay_square_ish(pooled_run):
    """A phone (390 px) gave the heatmap a 2 px strip: the specs fit only their width to the column."""
    run, _ = pooled_run
    _, spec = _heatmap(run)
    assert spec["width"] == "container" and spec["height"] == 340
    assert spec["autosize"] == {"type": "fit-x", "contains": "padding"}  # the height is never squeezed
    # a title line wider than the column made the fit shrink the plot to a strip: lines stop at the plot
    assert spec["title"] == {"text": "t", "limit": {"expr": "width"}}
    row = charts.row_chart(attnview.row_frame(run.trace(), run.attention(), 0, 1, None), "r", width="container")
    assert row.to_dict()["width"] == "container" and row.to_dict()["height"] == 160
    grid = charts.heads_grid_chart(attnview.heads_frame(run.trace(), run.attention(), 0, 1), "g").to_dict()
    assert grid["columns"] * grid["spec"]["width"] + (grid["columns"] - 1) * grid["spacing"] <= 340


def test_app_attention_charts_are_sent_at_container_width(tiny_llama, pooled_run):
    run, _ = pooled_run
    at = _tab(run, tiny_llama)
    specs = [s for s, _ in chart_specs(at)]
    assert [s["width"] for s in specs] == ["container", "container"]


def test_attention_axes_show_integer_positions_and_tokens_when_few(pooled_run):
    run, _ = pooled_run
    length = run.prompt_len + len(run.trace().steps) - 1
    _, wide = _heatmap(run)
    x = wide["layer"][0]["encoding"]["x"]["axis"]
    assert x["tickMinStep"] == 1 and x["format"] == "d"  # never a 2.5 position
    frame, zoomed = _heatmap(run, attnview.Window.clamp(10, 30, length))
    axis = zoomed["layer"][0]["encoding"]["y"]["axis"]
    assert axis["values"] == [p + 0.5 for p in range(10, 30)]  # one label at each cell's centre
    first = frame[(frame["k0"] == 10) & (frame["k1"] == 11)]["k_name"].iloc[0]  # "10: token"
    labels = json.loads(axis["labelExpr"].split("[floor")[0])
    assert len(labels) == 20 and labels[0] == first.replace(": ", " ", 1)
    legend = zoomed["layer"][0]["encoding"]["color"]["legend"]
    top = float(frame["weight"].max())
    assert legend["orient"] == "bottom" and legend["values"] == [0, top / 4, top]  # three labels, not crowded


def _attention(at) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The step's row and the heatmap on screen, as data."""
    shown = dict(zip(chart_titles(at), (data[0] for _, data in chart_specs(at))))
    row = next(d for t, d in shown.items() if t.startswith("Where step"))
    heat = next(d for t, d in shown.items() if t.startswith("Attention of the sequence"))
    return row, heat


def test_zoom_survives_a_step_change_and_the_heads_page_opens_on_it(generated):
    at = generated
    at.session_state["gen_tabs"] = "Attention"
    at.number_input(key="gen_attn_layer").set_value(0)
    at.selectbox(key="gen_attn_head").set_value("head 2")
    at.slider(key="gen_attn_range").set_value((3, 9)).run()
    row, heat = _attention(at)
    assert (heat["k0"].min(), heat["q1"].max()) == (3, 10) and (row["k0"].min(), row["k1"].max()) == (3, 10)
    at.slider(key="gen_step").set_value(2).run()  # another step: the zoom and the row follow
    assert not at.exception, at.exception
    assert at.slider(key="gen_attn_range").value == (3, 9)
    row, heat = _attention(at)
    assert (heat["k0"].min(), heat["q1"].max()) == (3, 10) and (row["k0"].min(), row["k1"].max()) == (3, 10)
    assert any(t.startswith("Where step 2's query looked layer 0, head 2") for t in chart_titles(at))
    at.switch_page("pages/heads.py").run()
    assert not at.exception, at.exception
    assert at.slider(key="heads_step").value == 2
    assert at.number_input(key="heads_layer").value == 0
    assert at.selectbox(key="heads_head").value == "head 2"
    assert at.slider(key="heads_range").value == (3, 9)
    assert chart_titles(at)[-1] == "Layer 0, head 2"


def test_which_rule_colours_never_repeat():
    frame = pd.DataFrame(
        [
            {"stage": st, "stage_index": j, "label": f"{i}: t{i}", "token_id": i, "prob": 1 / (i + 1), "chosen": i == 0}
            for i in range(27)  # both top-k lists, the chosen token and EOS: more than category10's 10 colours
            for j, st in enumerate(["raw", "temperature", "top-p"])
        ]
    )
    spec = charts.stage_chart(frame, width="container").to_dict()
    scale = spec["encoding"]["color"]["scale"]
    assert scale["domain"][:3] == ["0: t0", "1: t1", "2: t2"]  # the likeliest candidates first
    assert len(scale["domain"]) == 27 and len(set(scale["range"])) == 27
    assert spec["width"] == "container" and spec["encoding"]["color"]["legend"]["orient"] == "bottom"


def test_step_axes_end_at_the_last_step_with_integer_ticks():
    steps = pd.DataFrame({"step": range(7), "label": "x"})
    timeline = steps.assign(panel="probability", value=0.5, series="chosen")
    replay = steps.assign(max_diff_raw=1e-7, max_diff_proc=3e-4)
    uncert = steps.assign(entropy=1.0, varentropy=1.0, surprisal=1.0, margin=0.1, torn=False)
    div = steps.assign(measure="KL", value=0.1)
    xs = [
        charts.timeline_chart(timeline).to_dict()["vconcat"][0]["layer"][0]["encoding"]["x"],
        charts.uncertainty_chart(uncert).to_dict()["vconcat"][0]["layer"][0]["encoding"]["x"],
        charts.divergence_chart(div).to_dict()["layer"][0]["encoding"]["x"],
        charts.replay_chart(replay).to_dict()["encoding"]["x"],
    ]
    for x in xs:
        assert x["scale"]["domain"] == [0, 6] and x["scale"]["nice"] is False
        assert x["axis"]["tickMinStep"] == 1 and x["axis"]["format"] == "d"


def test_replay_chart_names_its_lines_and_uses_one_tick_notation():
    replay = pd.DataFrame({"step": range(4), "label": "x", "max_diff_raw": 0.0, "max_diff_proc": 3e-4})
    spec = charts.replay_chart(replay, width="container").to_dict()
    color, y = spec["encoding"]["color"], spec["encoding"]["y"]
    assert color["scale"]["domain"] == ["raw model", "after processing"]
    assert y["axis"]["format"] == ".0e" and y["axis"]["values"] == [10.0**k for k in range(-12, -2)]
    data = next(iter(spec["datasets"].values()))
    assert {d["distribution"] for d in data} == {"raw model", "after processing"}


def test_logit_lens_labels_contrast_with_their_cell():
    frame = pd.DataFrame({"step": [0, 0], "layer": [0, 1], "top": ["a", "b"], "p_top": [0.1, 0.9], "p_chosen": 0.5})
    spec = charts.lens_grid_chart(frame.assign(chosen="a"), width="container").to_dict()
    rect, text = spec["layer"]
    assert text["mark"]["fontSize"] >= 11 and text["mark"]["limit"] == {"expr": "bandwidth('x') - 4"}
    colour = text["encoding"]["color"]
    assert colour["condition"] == {"test": "datum.p_top > 0.5", "value": "white"} and colour["value"] == "#1a1a1a"
    assert rect["encoding"]["color"]["scale"]["range"][0] != "#ffffff"  # pale cells still show on a dark page
    assert spec["width"] == "container"


def test_timeline_and_uncertainty_stacks_can_take_the_container_width():
    steps = pd.DataFrame({"step": range(5), "label": "x"})
    timeline = charts.timeline_chart(steps.assign(panel="probability", value=0.5, series="chosen"), width="container")
    uncert = steps.assign(entropy=1.0, varentropy=1.0, surprisal=1.0, margin=0.1, torn=False)
    for spec in (timeline.to_dict(), charts.uncertainty_chart(uncert, width="container").to_dict()):
        assert spec["autosize"] == {"type": "fit-x", "contains": "padding"}
        assert all(panel["width"] == "container" for panel in spec["vconcat"])
    assert "autosize" not in charts.timeline_chart(steps.assign(panel="probability", value=0.5, series="c")).to_dict()


def test_raw_and_processed_keep_their_colours_in_the_app_and_the_export():
    """The app's theme recoloured default series (raw light, processed dark) while the export kept Vega's
    (processed blue, raw orange): the timeline names its colours, so both show the same."""
    from explorer_core import charts, frames
    from tests import crafted

    spec = charts.timeline_chart(frames.timeline_frame(crafted.trace(4, 6)), width="container").to_dict()
    for panel in spec["vconcat"]:
        scale = panel["layer"][0]["encoding"]["color"]["scale"]
        for name, colour in zip(scale["domain"], scale["range"], strict=True):
            assert colour == (charts.PROCESSED_COLOR if "processed" in name else charts.RAW_COLOR)

"""The commitment strip: the layer from which each token stays the logit lens's top, and the tokens the
sampling rules chose; its frame, its chart, its place under the app's stream and in the HTML export."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from explorer_core import charts, frames
from explorer_core.config import GenerationConfig
from explorer_core.export_html import build
from explorer_core.stepper import generate
from explorer_core.trace import Candidates, LensRecord, StepRecord
from tests.apphelp import chart_titles, start, use_model

TITLE = "Commitment: the layer from which each token stays the lens's top"


def _step(token_id: int, top_ids: list[int] | None, rank: int = 1) -> StepRecord:
    cands = Candidates(ids=[token_id], labels=["t"], probs=[0.5])
    n = len(top_ids or [])
    lens = LensRecord(top_ids=top_ids, top_labels=["x"] * n, top_probs=[0.5] * n, chosen_probs=[0.5] * n) if n else None
    return StepRecord(
        step=0, position=3, token_id=token_id, piece="t", label="t", p_raw=0.5, p_proc=0.5, rank_raw=rank,
        entropy_raw=1.0, entropy_proc=1.0, top_raw=cands, top_proc=cands, time_s=0.0,
        lens=lens,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("top_ids", "want"),
    [
        ([7, 7, 7, 7], 0),  # top from the first layer on
        ([1, 2, 7, 7], 2),  # becomes top at layer 2 and stays
        ([7, 1, 7, 7], 2),  # top early, loses it, top again from layer 2: the later layer counts
        ([7, 7, 1, 7], 3),  # top only at the last layer
        ([7, 7, 7, 1], None),  # not top at the last layer: never committed
        ([7], 0),  # a one-layer lens
        (None, None),  # no lens recorded
    ],
)
def test_commit_layer_on_hand_built_steps(top_ids, want):
    assert frames.commit_layer(_step(7, top_ids)) == want


def _stays_top_from(top_ids: list[int], token: int) -> int:
    """An independent recomputation: the smallest k whose suffix of layers is all the token."""
    return min(k for k in range(len(top_ids)) if all(t == token for t in top_ids[k:]))


@pytest.fixture(scope="module")
def lens_runs(tiny_llama):
    """A greedy run and a hot sampled one (whose rules pick lower-ranked tokens), both with the lens."""
    common = dict(model="x", max_new_tokens=12, min_new_tokens=12, logit_lens=True, seed=5)
    # no repetition penalty: it is a sampling rule too, and made a greedy run pass over the model's top
    greedy = generate(tiny_llama, GenerationConfig(**common, temperature=0.0, repetition_penalty=1.0))
    hot = generate(tiny_llama, GenerationConfig(**common, temperature=3.0, top_p=1.0, top_k=0))
    return greedy.trace(), hot.trace()


def test_commitment_frame_of_a_real_run(lens_runs):
    checked = 0
    for trace in lens_runs:
        frame = frames.commitment_frame(trace)
        assert frame["step"].tolist() == [s.step for s in trace.steps]
        for s, row in zip(trace.steps, frame.itertuples(), strict=True):
            assert row.label == s.label and row.rank_raw == s.rank_raw and row.rules_chose == (s.rank_raw > 1)
            assert row.n_layers == trace.model.n_layers == len(s.lens.top_ids)
            if s.rank_raw == 1 and s.lens.top_ids[-1] == s.token_id:
                assert row.commit == _stays_top_from(s.lens.top_ids, s.token_id)
                checked += 1
            if s.rank_raw > 1:  # the last layer's lens is the model's own argmax, which the rules passed over
                assert pd.isna(row.commit)
                assert row.commit_text.startswith("never")
    assert checked >= 12  # every greedy step at least
    assert frames.commitment_frame(lens_runs[1])["rules_chose"].any(), "the hot run should have a rules' choice"


def test_commit_is_a_nullable_integer_column(lens_runs):
    frame = frames.commitment_frame(lens_runs[1])
    assert str(frame["commit"].dtype) == "Int64"
    assert frame.loc[frame["rules_chose"], "commit"].isna().all()


def test_chart_builds_with_one_row_per_step_and_a_legend_of_distinct_colours(lens_runs):
    trace = lens_runs[1]
    frame = frames.commitment_frame(trace)
    for width in ("container", 640):
        spec = charts.commitment_chart(frame, selected=3, width=width).to_dict()
        json.dumps(spec)
        assert " ".join(spec["title"]["text"] if width == "container" else spec["title"]) == TITLE
        assert len(spec["datasets"][spec["data"]["name"]]) == len(trace.steps)  # the frame, once
        assert spec["height"] <= 120
    colours = [layer["encoding"]["color"]["scale"] for layer in spec["layer"][:3]]
    assert all(c == colours[0] for c in colours)  # one shared scale: one legend
    assert len(set(colours[0]["range"])) == len(colours[0]["range"]) == 3
    assert "chosen by the sampling rules (raw rank > 1)" in colours[0]["domain"]
    x = spec["layer"][0]["encoding"]["x"]["scale"]
    assert x["domain"] == [0, len(trace.steps) - 1] and x["padding"] == 0  # the axis ends at the last step


def test_chart_of_a_trace_without_lens_or_steps_still_builds(lens_runs):
    no_lens = lens_runs[0].model_copy(
        update={"steps": [s.model_copy(update={"lens": None}) for s in lens_runs[0].steps]}
    )
    frame = frames.commitment_frame(no_lens)
    assert frame["commit"].isna().all() and not frame["has_lens"].any()
    charts.commitment_chart(frame).to_dict()
    charts.commitment_chart(frame.iloc[:0]).to_dict()


DATA = re.compile(r'<script type="application/json" id="data">(.*?)</script>', re.S)


def test_export_shows_the_strip_under_its_stream(lens_runs):
    trace = lens_runs[1]
    page = build(trace, None, vega_js="")
    data = json.loads(DATA.search(page).group(1))
    strip = data["commitment"]
    assert " ".join(strip["title"]) == TITLE and strip["width"] == 640
    assert len(strip["datasets"][strip["data"]["name"]]) == len(trace.steps)  # in the page: nothing fetched
    assert page.index('id="stream"') < page.index('<div id="commitment">') < page.index('id="timeline"')
    no_lens = trace.model_copy(update={"steps": [s.model_copy(update={"lens": None}) for s in trace.steps]})
    assert json.loads(DATA.search(build(no_lens, None, vega_js="")).group(1))["commitment"] is None


def test_app_draws_the_strip_when_the_lens_is_on(tiny_llama_dir):
    at = use_model(start(), tiny_llama_dir, max_new_tokens=6, min_new_tokens=6, logit_lens=True)
    at.button(key="gen_generate").click().run()
    assert not at.exception, at.exception
    assert TITLE in chart_titles(at)
    assert any("▲ = the sampling rules chose" in c.value for c in at.caption)


def test_app_draws_no_strip_without_the_lens(generated):
    assert not any("Commitment" in t for t in chart_titles(generated))

"""Bounded cost: crafted small files whose views once grew without bound now draw a bounded number of
cells, and the stores refuse shapes no view could afford."""

from __future__ import annotations

import pytest

from explorer_core import attnview, tracefile
from explorer_core.attnstore import MAX_CELLS
from explorer_core.trace import TraceError
from tests import crafted
from tools import bounded_cost

BUDGET = attnview.DEFAULT_BINS * (attnview.DEFAULT_BINS + 1) // 2 + attnview.DEFAULT_BINS + 1


def test_8192_token_prompt_with_one_head_draws_a_bounded_heatmap(tmp_path):
    tr = crafted.trace(8192, 2, cells=MAX_CELLS)
    trace, store = tracefile.load(crafted.saved_pair(tmp_path, tr))
    assert (tmp_path / trace.attention.file).stat().st_size < 3 * 2**20
    for step in (0, 1):
        frame = attnview.heatmap_frame(trace, store, step, 0, 0)
        assert len(frame) <= BUDGET and frame["q1"].max() == 8192 + step
    assert len(attnview.row_frame(trace, store, 1, 0, None)) <= attnview.ROW_BINS + 1


def test_prompt_cells_beyond_the_view_budget_are_refused(tmp_path):
    tr = crafted.trace(2048, 1)  # claims its 2,048-token prompt is stored exactly: 2,048² cells per head
    path = crafted.saved_pair(
        tmp_path, tr.model_copy(update={"attention": tr.attention.model_copy(update={"prompt_cells": 2048})})
    )
    with pytest.raises(TraceError, match="2048 prompt cells"):
        tracefile.load(path)


def test_2300_snapshots_draw_at_most_the_snapshot_budget():
    tr = crafted.trace(4, 2300, snapshots=True)
    frame = attnview.snapshot_frame(tr)
    assert frame["step"].nunique() <= attnview.MAX_SNAPSHOT_ROWS
    assert len(frame) <= attnview.MAX_SNAPSHOT_ROWS * (attnview.DEFAULT_BINS + 1)


def test_1024_heads_show_at_most_a_page_of_heads(tmp_path):
    tr = crafted.trace(256, 2, layers=1, heads=1024, cells=64)
    trace, store = tracefile.load(crafted.saved_pair(tmp_path, tr))
    frame = attnview.heads_frame(trace, store, 1, 0, list(range(1024)), attnview.Window(0, 257, 256))
    assert frame["head"].nunique() == attnview.MAX_HEADS_SHOWN
    assert len(frame) <= attnview.MAX_HEADS_SHOWN * (attnview.HEAD_BINS + 1) ** 2


def test_html_export_of_a_long_run_stays_small(tmp_path):
    from explorer_core.export_html import build

    tr = crafted.trace(1024, 40, cells=256)
    trace, store = tracefile.load(crafted.saved_pair(tmp_path, tr))
    page = build(trace, store)
    assert len(page) < 20 * 2**20


@pytest.mark.parametrize("case", list(bounded_cost.CASES.values()))
def test_watchdog_each_crafted_upload_in_its_own_process(case):
    """Uploaded to the viewer in a fresh process: no exception, memory bounded, done before the watchdog."""
    result = bounded_cost.measure(case, timeout=300)  # the watchdog: a case that hangs fails here
    assert not result["exception"], result
    assert result["peak_above_app_mb"] < 1536, result
    if case == "lying_zip":
        assert result["said"].startswith("refused"), result
    else:
        assert result["charts"] >= 1, result


def test_replay_and_explain_are_held_to_the_host_limits():
    from explorer_core.limits import Limits

    hosted = Limits(hosted=True, max_prompt_tokens=1024, max_new_tokens=512)
    with pytest.raises(ValueError, match="EXPLORER_MAX_PROMPT_TOKENS"):
        hosted.check_replay(crafted.trace(8000, 1))
    hosted.check_replay(crafted.trace(1000, 3))  # within the limits: no refusal


def test_one_model_cache_key_per_set_of_weights():
    from explorer_ui.resources import canonical

    assert canonical("SmolLM2-135M-Instruct", "auto", "cpu") == canonical(" smollm2-135m-instruct ", "float32", "auto")
    assert canonical("HuggingFaceTB/SmolLM2-135M-Instruct", "auto", "cpu") == canonical(
        "SmolLM2-135M-Instruct", "auto", "cpu"
    )
    assert canonical("gpt2", "auto", "cpu") != canonical("gpt2", "bfloat16", "cpu")

"""The one-file HTML export holds each stored step once: a branch carries only its own steps, so chained
branches late in a long run cost what they store, not the length of their paths; and every token the page
lets you click still finds its top-k data."""

from __future__ import annotations

import html
import json
import re

from explorer_core.export_html import build
from explorer_core.trace import Branch, Trace
from tests import crafted

MAIN_STEPS = 2000
CHAINED = 32
DATA = re.compile(r'<script type="application/json" id="data">(.*?)</script>', re.S)
TOKEN = re.compile(r'class="tok" data-path="(\d+)" data-step="(\d+)"')


def chained_branches(main: Trace, count: int) -> Trace:
    """`count` branches, each from the previous one (the first from the main run), one own step each,
    all near the end of the run: every path is almost MAIN_STEPS long, the stored branch steps are few."""
    branches, first = [], len(main.steps) - count
    for k in range(1, count + 1):
        at = first + k - 1  # the parent's last step: the parent's path reaches exactly here
        own = main.steps[at].model_copy(update={"token_id": 10 + k, "label": f"b{k}", "forced": True})
        branches.append(
            Branch(id=k, parent=k - 1, at_step=at, steps=[own], stop_reason="max_new_tokens", output_text=f"b{k}")
        )
    return Trace.model_validate(main.model_dump() | {"branches": [b.model_dump() for b in branches]})


def page_data(page: str) -> dict:
    return json.loads(DATA.search(page).group(1))


def test_chained_late_branches_cost_their_own_steps_not_their_paths():
    main = crafted.trace(8, MAIN_STEPS)
    branched = chained_branches(main, CHAINED)
    assert min(len(branched.path_steps(b.id)) for b in branched.branches) > MAIN_STEPS - CHAINED
    alone, with_branches = len(build(main, None, vega_js="")), len(build(branched, None, vega_js=""))
    # 32 stored steps beside 2,000: a few percent more; copying each path would make it about 33 times
    assert with_branches < 1.2 * alone, (alone, with_branches)
    data = page_data(build(branched, None, vega_js=""))
    stored = sum(len(rows) for rows in data["topk"].values())
    assert stored == MAIN_STEPS + CHAINED


def test_every_clickable_token_finds_its_top_k(tmp_path):
    main = crafted.trace(8, 40)
    branched = chained_branches(main, 5)
    page = build(branched, None, vega_js="")
    data = page_data(page)  # the data block parses as JSON
    tokens = [(int(p), int(s)) for p, s in TOKEN.findall(page)]
    assert len(tokens) == 40 + 5 and {p for p, _ in tokens} == set(range(6))
    for path, step in tokens:
        start = data["start"][str(path)]
        assert 0 <= step - start < len(data["topk"][str(path)]), (path, step, start)
        rows = data["topk"][str(path)][step - start]
        chosen = {r["token_id"] for r in rows if r["chosen"]}
        assert chosen == {branched.path_steps(path)[step].token_id}, (path, step)  # absolute step, right token


def test_the_notebook_view_is_bounded_the_same_way(monkeypatch):
    from explorer_core import notebook

    monkeypatch.setattr(notebook, "_vega_sent", True)  # the Vega bundle went out with an earlier view
    main = crafted.trace(8, MAIN_STEPS)
    alone = len(notebook.attach(main, None)._repr_html_())
    view = notebook.attach(chained_branches(main, CHAINED), None)._repr_html_()
    assert len(view) < 1.2 * alone, (alone, len(view))
    frame = html.unescape(re.search(r'srcdoc="([^"]*)"', view).group(1))
    assert page_data(frame)["start"] == {
        str(k): (0 if k == 0 else MAIN_STEPS - CHAINED + k - 1) for k in range(CHAINED + 1)
    }

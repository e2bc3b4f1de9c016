"""The report tools: markdown sections kept across regenerations, the walkthrough's table, and the
attention memory estimate's formula (pinned on a small case; no memory is measured here)."""

from __future__ import annotations

import re

from explorer_core.limits import attention_cost
from tools import mdsections

DOC = "# Title\n\nIntro.\n\n## First\n\none\n\n## Second\n\ntwo\n| a | b |\n"


def test_sections_are_replaced_in_place_or_appended():
    assert mdsections.get(DOC, "Second") == "## Second\n\ntwo\n| a | b |\n"
    assert mdsections.get(DOC, "Third") is None
    assert mdsections.replace(DOC, "First", mdsections.get(DOC, "First")) == DOC  # a round trip changes nothing
    swapped = mdsections.replace(DOC, "First", "## First\n\nuno\n")
    assert "uno" in swapped and "one" not in swapped and swapped.index("uno") < swapped.index("two")
    added = mdsections.replace(DOC, "Third", "## Third\n\nthree")
    assert added.startswith(DOC.rstrip()) and added.endswith("\n\n## Third\n\nthree\n")


def test_reliability_report_keeps_the_hand_run_sections():
    from tools.reliability_report import HAND_RUN, keep_hand_run

    heading = next(iter(HAND_RUN))
    old = DOC + f"\n## {heading}\n\nmeasured by hand\n"
    regenerated = "# Reliability\n\n## First\n\nnew one\n"
    text = keep_hand_run(regenerated, old)
    assert text.startswith(regenerated.rstrip()) and text.count(f"## {heading}") == 1
    assert mdsections.get(text, heading).strip() == f"## {heading}\n\nmeasured by hand"
    assert keep_hand_run(regenerated, "") == regenerated  # nothing to keep: nothing added


def test_walkthrough_table_names_failures_in_one_cell():
    from tools.hosted_walkthrough import Row, table

    rows = [Row("open the app", 1.25, 476.2, 480.0, 490.4), Row("upload", 2.0, 500, 510, 520, ["bad | file"])]
    lines = table(rows).splitlines()
    assert lines[2] == "| open the app | 1.2 | 476 MB | 480 MB | 490 MB |"
    assert lines[3].startswith("| upload — **failed**: bad \\| file | 2.0 |")
    assert all(len(re.findall(r"(?<!\\)\|", line)) == 6 for line in lines[2:])  # five cells in every row


def test_attention_memory_estimate_formula():
    """Cells, the pending row and its copy, four prefill chunks; a short prompt's chunk is its whole T×T."""
    small = attention_cost(100, 10, layers=2, heads=3)
    assert small.prompt_cells == 100  # exact: 100×100 cells fit the 40 MiB budget
    # float32 cells 2·3·100², rows 2·2·3·110, four chunks of 3 heads × 100 queries × 100 keys
    assert small.memory_mb * 2**20 == 4 * 2 * 3 * (100 * 100 + 2 * 110) + 4 * (4 * 3 * 100 * 100)
    assert small.disk_mb * 2**20 == (2 * 3 * 100 * 100 * 2 + 8 * 101) + sum(2 * 3 * (100 + s) * 2 for s in range(10))
    long = attention_cost(4000, 0, layers=1, heads=1)
    assert long.prompt_cells == 1000  # 1,024 cells at most per axis: 4 positions per cell
    queries = 16 * 2**20 // (4 * 4000)  # a chunk holds what fits capture.CHUNK_BYTES
    assert long.memory_mb * 2**20 == 4 * (1000 * 1000 + 2 * 4000) + 4 * (4 * queries * 4000)


def test_bench_report_keeps_separately_run_sections(tmp_path, monkeypatch):
    """A full `make bench` keeps sections 8 and 9 (their own scripts) and drops last run's analysis;
    `--only` replaces its group's sections and leaves the rest of the file as it was."""
    from bench import run_all

    old = (
        "# Benchmarks\n\nold header\n\n## 5. Memory\n\nold five\n\n## 8. Explaining one step (x)\n\nexplain rows\n\n"
        "## 9. Reading attention rows: y\n\ncapture rows\n\n## Analysis of the misses in this run\n\nold analysis\n"
    )
    assert run_all.keep_hand_run("# Benchmarks\n", old) == (
        "# Benchmarks\n\n## 8. Explaining one step (x)\n\nexplain rows\n\n## 9. Reading attention rows: y\n\ncapture rows\n"
    )
    out = tmp_path / "BENCHMARKS.md"
    out.write_text(old, encoding="utf-8")
    monkeypatch.setattr(run_all, "OUT", out)
    monkeypatch.setattr(run_all, "machine", lambda: "here")
    monkeypatch.setitem(run_all.SECTIONS, "processes", lambda: ["## 5. Memory\n\nnew five\n\n## 6. Start-up\n\nsix\n"])
    run_all.main(["--only", "processes"])
    text = out.read_text(encoding="utf-8")
    assert "old header" in text and "old analysis" in text and "old five" not in text
    assert "## 5. Memory\n\nRun on its own (`--only`): here.\n\nnew five" in text
    assert text.index("## 5. Memory") < text.index("## 8.") < text.index("## 6. Start-up")


def test_app_server_starts_answers_and_stops(tmp_path):
    """The one way scripts and tests start the app: ready when /_stcore/health answers, gone on exit."""
    import os
    import urllib.request

    from tools.appserver import streamlit_app

    with streamlit_app(tmp_path / "server.log", {"HF_HUB_OFFLINE": "1"}) as (url, pid):
        assert urllib.request.urlopen(url + "/_stcore/health", timeout=5).read() == b"ok"
        assert os.path.exists(f"/proc/{pid}")
    assert not os.path.exists(f"/proc/{pid}")  # stopped and reaped

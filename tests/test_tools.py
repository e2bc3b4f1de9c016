"""The report tools: markdown sections kept across regenerations, the walkthrough's table, and the
attention memory estimate's formula (pinned on a small case; no memory is measured here)."""

from __future__ import annotations

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

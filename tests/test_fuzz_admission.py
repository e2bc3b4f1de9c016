"""The structure fuzzer (tools/fuzz_admission.py): hypothesis makes small files with large declared sizes,
deep nesting, wrong types and special files; a worker with a capped address space sends each through
admission and, when admitted, through every view, the downloads, the export and the notebook view.

Every file is refused with a sentence or admitted and then costs at most the budget: nothing escapes as
an exception, nothing admitted fails later, and no file grows the worker past its cap (the worker would
die, and `ask` says so). EXPLORER_FUZZ_EXAMPLES sets the number of files (CI: 40);
EXPLORER_FUZZ_LOG=path keeps every result line for RELIABILITY.md (`python -m tools.reliability_report`).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from explorer_core.trace import MAX_TRACE_BYTES
from tools import fuzz_admission as fz

EXAMPLES = int(os.environ.get("EXPLORER_FUZZ_EXAMPLES", "40"))


def feasible(spec: dict) -> dict:
    """Keep the test's own building cheap: the file stays small even when what it declares is not. An
    honest companion too large to write here keeps its kind with fewer heads, layers or positions."""
    if spec["companion"] in ("honest", "truncated", "values", "v1"):
        while _honest_bytes(spec) > 16 * 2**20 or (spec["companion"] == "v1" and _v1_work(spec) > 100_000):
            key = max(("heads", "layers", "prompt_len"), key=lambda k: spec[k])
            spec[key] = max(1, spec[key] // 4)
    t, n, lh = spec["prompt_len"], spec["steps"], spec["layers"] * spec["heads"]
    spec["snapshots"] &= t * n <= 100_000
    spec["lens"] &= spec["layers"] * n <= 60_000
    if spec["explanations"] * lh > 2_000_000:
        spec["explanations"] = 1
    return spec


def _honest_bytes(spec: dict) -> int:
    t, n, lh = spec["prompt_len"], spec["steps"], spec["layers"] * spec["heads"]
    cells = min(t, 1024, max(1, int((40 * 2**20 / (lh * 2)) ** 0.5)))
    return lh * (cells * cells + n * t + n * n) * 2


def _v1_work(spec: dict) -> int:
    return spec["layers"] * spec["heads"] * spec["prompt_len"]


SPECS = st.fixed_dictionaries(
    {
        "prompt_len": st.sampled_from([1, 4, 300, 2048, 8192]),
        "steps": st.sampled_from([0, 1, 3, 40, 400]),
        "layers": st.sampled_from([1, 2, 30, 1024]),
        "heads": st.sampled_from([1, 2, 9, 1024]),
        "snapshots": st.booleans(),
        "lens": st.booleans(),
        "branches": st.sampled_from([0, 1, 64]),
        "explanations": st.sampled_from([0, 1, 64]),
        # honest files half the time: the admitted ones are those whose views must stay bounded
        "companion": st.sampled_from(("honest",) * 4 + fz.COMPANION_KINDS),
        "trace_mutation": st.sampled_from(("none",) * 6 + fz.TRACE_MUTATIONS),
        "field": st.sampled_from(["steps", "model", "prompt_ids", "branches", "attention", "config", "explanations"]),
        "field_meta": st.sampled_from(["layers", "heads", "prompt_len", "bins", "steps", "dtype", "format"]),
        "lie": st.sampled_from(fz.LIES),
    }
).map(feasible)


@pytest.fixture(scope="module")
def worker():
    proc = fz.start_worker()
    yield proc
    proc.stdin.close()
    proc.wait(timeout=60)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
@given(spec=SPECS)
def test_every_file_is_refused_or_admitted_and_bounded(worker, spec):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "case"
        fz.build(spec, folder)
        result = fz.ask(worker, folder)
    if os.environ.get("EXPLORER_FUZZ_LOG"):
        with open(os.environ["EXPLORER_FUZZ_LOG"], "a") as fh:
            fh.write(json.dumps({"spec": spec, "result": result}) + "\n")
    assert result["outcome"] in ("refused", "admitted"), result["said"]
    assert not result["upload_exception"], result
    assert result["peak_mb"] <= fz.PEAK_BUDGET_MB, result
    if result["outcome"] == "refused":
        assert result["said"]
    else:  # admitted: nothing fails later, nothing grows past the caps
        assert not result["upload_said"], result
        assert result["sizes"]["json"] <= MAX_TRACE_BYTES

"""Hostile and broken trace files, each with the message the loader must give (used by the tests
and by tools/reliability_report.py, which writes RELIABILITY.md from what actually happens)."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOOD = (ROOT / "examples" / "sky-sampled" / "trace.json").read_bytes()


def _with(**changes) -> bytes:
    data = json.loads(GOOD)
    data.update(changes)
    return json.dumps(data).encode()


def cases() -> list[tuple[str, bytes, str]]:
    """(name, file bytes, expected part of the error message)."""
    g = json.loads(GOOD)
    return _syntax_cases() + _content_cases(g) + _cross_field_cases(g)


def _syntax_cases() -> list[tuple[str, bytes, str]]:
    """Files that are not a trace at all."""
    return [
        ("empty file", b"", "the file is empty"),
        ("whitespace only", b"  \n ", "the file is empty"),
        ("not JSON (a PNG's bytes)", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not valid JSON"),
        ("truncated JSON", GOOD[:1000], "not valid JSON: Invalid JSON: EOF while parsing"),
    ]


def _content_cases(g: dict) -> list[tuple[str, bytes, str]]:
    """JSON that parses but breaks the schema, its bounds or its cross-field rules."""
    return [
        (
            "wrong type (steps is a string)",
            _with(steps="many"),
            "invalid trace at steps: Input should be a valid array",
        ),
        (
            "missing key (model)",
            json.dumps({k: v for k, v in g.items() if k != "model"}).encode(),
            "invalid trace at model: Field required",
        ),
        (
            "NaN probability",
            GOOD.replace(b'"p_raw": 0.', b'"p_raw": NaN, "x": 0.', 1),
            "invalid trace at steps.0.p_raw: Input should be a finite number",
        ),
        (
            "Infinity timing",
            _with(timing={**g["timing"], "load_s": 1e999}),
            "invalid trace at timing.load_s: Input should be a finite number",
        ),
        (
            "probability above 1",
            GOOD.replace(b'"p_raw": 0.', b'"p_raw": 1', 1),
            "invalid trace at steps.0.p_raw: Input should be less than or equal to 1",
        ),
        (
            "nesting 100 000 deep",
            b"[" * 100_000 + b"]" * 100_000,
            "not valid JSON: Invalid JSON: recursion limit exceeded",
        ),
        ("invalid UTF-8", GOOD.replace(b'"output_text": "', b'"output_text": "\xff\xfe', 1), "not valid JSON"),
        ("lone surrogate escape", GOOD.replace(b'"output_text": "', b'"output_text": "\\ud800', 1), "not valid JSON"),
        (
            "5 000-digit integer",
            GOOD.replace(b'"prompt_ids": [', b'"prompt_ids": [' + b"9" * 5000 + b",", 1),
            "not valid JSON: Invalid JSON: number out of range",
        ),
        ("5 000 steps", _with(steps=[g["steps"][0]] * 5000), "List should have at most 4096 items"),
    ]


def _cross_field_cases(g: dict) -> list[tuple[str, bytes, str]]:
    """Fields that are each fine alone but disagree with the rest of the trace."""
    return [
        ("steps out of order", _with(steps=[g["steps"][1], g["steps"][0]]), "step 0 is numbered 1"),
        (
            "token label of 10 000 characters",
            _with(steps=[{**g["steps"][0], "label": "x" * 10_000}] + g["steps"][1:]),
            "invalid trace at steps.0.label: String should have at most 256 characters",
        ),
        (
            "token id beyond the model's vocabulary",
            _with(steps=[{**g["steps"][0], "token_id": 9_999_999}] + g["steps"][1:]),
            "token id 9999999 is outside the model's vocabulary of 49152",
        ),
        (
            "a setting out of range in config",
            _with(config={**g["config"], "temperature": 9}),
            "temperature=9 is out of range",
        ),
        (
            "empty stage track",
            _with(
                steps=[{**g["steps"][0], "stages": {"stages": [], "ids": [], "labels": [], "probs": []}}]
                + g["steps"][1:]
            ),
            "stage track: needs the 'raw' stage first",
        ),
        (
            "logit lens lists of different lengths",
            _with(steps=[{**g["steps"][0], "lens": {**g["steps"][0]["lens"], "chosen_probs": []}}] + g["steps"][1:]),
            "logit lens: the four per-layer lists must be non-empty and of the same length",
        ),
        (
            "branch naming an unknown parent",
            _with(
                branches=[{"id": 1, "parent": 5, "at_step": 0, "steps": [], "stop_reason": "eos", "output_text": ""}]
            ),
            "names an unknown parent 5",
        ),
        ("future schema version", _with(schema_version=3), "unsupported schema_version"),
        ("unknown extra field", _with(surprise=1), "invalid trace at surprise: Extra inputs are not permitted"),
        ("a JSON list instead of an object", b"[1, 2, 3]", "invalid trace at file"),
    ]

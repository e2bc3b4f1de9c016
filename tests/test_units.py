"""Unit tests without a model: config validation, label rules, processors on ramp logits, purity."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from explorer_core.config import GenerationConfig
from explorer_core.processors import BlockTokensForNewSteps, build_chain
from explorer_core.tokens import piece_bytes, readable


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("temperature", -0.1, "temperature=-0.1 is out of range: use a value from 0.0 to 5.0"),
        ("top_p", 0.0, "top_p=0.0 is out of range"),
        ("top_k", 2.5, "top_k=2.5 must be a whole number"),
        ("max_new_tokens", 0, "max_new_tokens=0 is out of range: use a value from 1 to 2048"),
        ("temperature", float("nan"), "temperature=nan must be a finite number"),
        ("dtype", "float8", "dtype='float8' is not one of auto, float32, bfloat16, float16"),
        ("chat", "yes", "chat='yes' is not true or false"),
    ],
)
def test_config_names_bad_value_and_range(field, value, needle):
    with pytest.raises(ValueError) as info:
        GenerationConfig(**{field: value})
    assert needle in str(info.value)


def test_config_min_above_max():
    with pytest.raises(ValueError, match="min_new_tokens=9 exceeds max_new_tokens=5"):
        GenerationConfig(max_new_tokens=5, min_new_tokens=9)


def test_config_round_trip_ignores_unknown_keys():
    cfg = GenerationConfig(prompt="hi", top_k=7)
    data = cfg.to_dict() | {"from_the_future": 1}
    assert GenerationConfig.from_dict(data) == cfg


@pytest.mark.parametrize(
    "piece,byte_level,label",
    [
        ("Ġthe", True, "␣the"),
        ("Ċ", True, "↵"),
        ("ĊĊ", True, "↵↵"),
        ("▁the", False, "␣the"),
        ("<0x0A>", False, "↵"),
        ("<0xE2>", False, "⟨e2⟩"),
        ("âĢ", True, "⟨e2 80⟩"),  # first two bytes of a three-byte character
        ("ĉ", True, "⇥"),
    ],
)
def test_readable_labels(piece, byte_level, label):
    assert readable(piece_bytes(piece, byte_level)) == label


def test_readable_control_characters_are_escaped():
    assert readable(b"\x0b") == "\\x0b"


def ramp(n: int = 10) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32)[None, :]  # (1, n): token i has logit i


def test_block_tokens_masks_only_early_steps_and_never_in_place():
    proc = BlockTokensForNewSteps([9, 3], prompt_length=4, steps=2)
    scores = ramp()
    early = proc(torch.zeros((1, 5), dtype=torch.long), scores)  # 1 new token so far
    assert torch.isinf(early[0, [3, 9]]).all() and early[0, 8] == 8
    assert scores[0, 9] == 9  # input untouched
    late = proc(torch.zeros((1, 6), dtype=torch.long), scores)  # 2 new tokens: rule is over
    assert torch.equal(late, scores)


def test_chain_order_matches_generate():
    cfg = GenerationConfig(
        repetition_penalty=1.2,
        no_repeat_ngram_size=2,
        block_eos_steps=3,
        block_ws_steps=2,
        temperature=0.7,
        top_k=5,
        top_p=0.9,
    )
    names = [s.name for s in build_chain(cfg, 4, [0], [1])]
    assert names == ["repetition", "no_repeat_ngram", "block_eos", "block_ws", "temperature", "top_k", "top_p"]


def test_greedy_chain_has_no_warpers():
    cfg = GenerationConfig(temperature=0.0, top_k=5, top_p=0.5)
    assert [s.name for s in build_chain(cfg, 4, [0], [])] == ["repetition"]


def test_core_never_imports_streamlit():
    code = (
        "import sys, explorer_core, explorer_core.stepper, explorer_core.charts, explorer_core.cli,"
        " explorer_core.artifacts, explorer_core.runner; print('streamlit' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_verdict_names_the_largest_change_and_the_removal():
    """A penalty cut the candidate from 0.436 to 0.028, then top-p removed it: both are named."""
    from explorer_core.frames import _stage_verdict

    stages = ["raw", "repetition", "temperature", "top_p"]
    verdict = _stage_verdict(stages, [0.436, 0.028, 0.031, 0.0], chosen=False)
    assert verdict == "removed by top-p (0.031 → 0); changed most by repetition penalty (0.436 → 0.028)"
    assert _stage_verdict(stages, [0.2, 0.19, 0.18, 0.0], chosen=False) == "removed by top-p (0.180 → 0)"
    assert _stage_verdict(stages, [0.2, 0.1, 0.3, 0.4], chosen=True).startswith("chosen; changed most by temperature")


def _project_imports() -> dict[str, set[str]]:
    """Every project module and the project modules it imports, at top level or inside functions."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = {
        ".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
        for pkg in ("explorer_core", "explorer_ui")
        for p in (root / pkg).rglob("*.py")
    }
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                subs = {f"{base}.{a.name}" for a in node.names} & set(files)
                # `from . import capture` needs the submodule; the package itself is initialised first anyway
                deps |= subs if len(subs) == len(node.names) else {base} | subs
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def test_no_import_circle_among_project_modules():
    graph = _project_imports()
    assert "explorer_ui.views" in graph and "explorer_ui.base" in graph["explorer_ui.views"]

    def cycle_from(start, node, seen):
        for nxt in graph[node]:
            if nxt == start:
                return [node, nxt]
            if nxt not in seen:
                seen.add(nxt)
                found = cycle_from(start, nxt, seen)
                if found:
                    return [node, *found]
        return None

    for name in graph:
        assert cycle_from(name, name, {name}) is None, f"import circle: {' -> '.join(cycle_from(name, name, {name}))}"
    ui_base = {d for d in graph["explorer_ui.base"] if d.startswith("explorer_ui")}
    assert ui_base == set(), f"explorer_ui.base imports {ui_base}"


def test_export_keeps_its_data_under_a_foreign_data_transformer():
    """Streamlit switches Altair's global data transformer while a page draws a chart; an export built
    meanwhile must still carry every chart's data (an empty timeline was the symptom)."""
    import json
    import re
    from pathlib import Path

    import altair as alt

    from explorer_core import tracefile
    from explorer_core.export_html import build

    trace, attn = tracefile.load(Path(__file__).resolve().parents[1] / "examples" / "sky-sampled" / "trace.json")
    alt.data_transformers.register("elsewhere", lambda data: {"name": "kept-elsewhere"})
    with alt.data_transformers.enable("elsewhere"):
        page = build(trace, attn)
    data = json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S).group(1))
    timeline = data["timeline"]
    names = set(re.findall(r'"name": "([^"]+)"', json.dumps({k: v for k, v in timeline.items() if k != "datasets"})))
    assert names and names <= set(timeline["datasets"])  # every named dataset is in the page
    assert sum(len(rows) for rows in timeline["datasets"].values()) >= 5 * len(trace.steps)
    assert len(data["topk"]["0"]) == len(trace.steps)


def test_identical_distributions_diverge_by_exactly_zero():
    """Float32 rounding once plotted about 4e-8 bits between identical runs as if it were signal."""
    from types import SimpleNamespace

    from explorer_core.compare import _frame

    trace = SimpleNamespace(steps=[SimpleNamespace(label=str(i)) for i in range(3)])
    lp = torch.log_softmax(torch.randn(3, 49152, generator=torch.Generator().manual_seed(0)), -1)
    frame, first = _frame(trace, lp, lp.clone(), with_kl=True)
    assert frame["value"].max() == 0.0 and first is None

"""Small valid-looking files whose views would cost without bound, made in the test (never stored)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from explorer_core.attnstore import AttentionWriter, Shape, pooling_edges
from explorer_core.trace import AttentionInfo, Candidates, StepRecord, Trace


def _step(i: int, t: int, snapshot: bool) -> StepRecord:
    cands = Candidates(ids=[1, 2], labels=["a", "b"], probs=[0.6, 0.4])
    snap = list(np.full(t + i, 1.0 / (t + i)).round(6)) if snapshot else None
    return StepRecord(
        step=i, position=t + i, token_id=1, piece="a", label="a", p_raw=0.6, p_proc=0.6, rank_raw=1,
        entropy_raw=1.0, entropy_proc=1.0, top_raw=cands, top_proc=cands, time_s=0.01, attn_snapshot=snap,
    )  # fmt: skip


def trace(prompt_len: int, steps: int, layers: int = 1, heads: int = 1, snapshots: bool = False, cells=None) -> Trace:
    """A schema-valid trace of any shape, with an attention section for a companion of (layers, heads)."""
    info = AttentionInfo(
        file=None, layers=layers, heads=heads, prompt_cells=cells or prompt_len, snapshot_layer=0, snapshot_every=1
    )
    return Trace(
        created="2026-01-01T00:00:00+00:00",
        model={"name": "crafted", "location": "crafted", "dtype": "float32", "device": "cpu",
               "n_layers": layers, "n_heads": heads, "vocab_size": 100},
        versions={},
        config={"model": "crafted", "max_new_tokens": min(max(steps, 1), 2048)},
        chat_applied=False,
        input_text="x",
        prompt_ids=[3] * prompt_len,
        prompt_pieces=["x"] * prompt_len,
        prompt_labels=["x"] * prompt_len,
        steps=[_step(i, prompt_len, snapshots) for i in range(steps)],
        stop_reason="max_new_tokens",
        output_text="a" * steps,
        timing={"load_s": 0, "prefill_s": 0, "generate_s": 0, "tokens_per_s": 0},
        attention=info,
    )  # fmt: skip


def companion(path: Path, tr: Trace, cells: int | None = None) -> Path:
    """A finished companion of uniform causal attention for `tr` (prompt cells `cells` per axis)."""
    info, t = tr.attention, tr.prompt_len
    b = cells or info.prompt_cells
    width = -(-t // b)
    edges = pooling_edges(t, width)
    w = AttentionWriter(path, Shape(info.layers, info.heads, t, len(edges) - 1), max_steps=len(tr.steps))
    w.write_prompt(np.full((info.layers, info.heads, len(edges) - 1, len(edges) - 1), 1.0 / t, np.float32), edges)
    for s in range(len(tr.steps)):
        w.write_row(np.full((info.layers, info.heads, t + s), 1.0 / (t + s), np.float32))
    w.finish()
    return path


def saved_pair(folder: Path, tr: Trace, cells: int | None = None) -> Path:
    """trace.json naming its companion in `folder`, written as is (no checks: crafted files may lie)."""
    from explorer_core.trace import dumps

    folder.mkdir(parents=True, exist_ok=True)
    companion(folder / "trace.crafted.attn.safetensors", tr, cells)
    info = tr.attention.model_copy(update={"file": "trace.crafted.attn.safetensors"})
    path = folder / "trace.json"
    path.write_text(dumps(tr.model_copy(update={"attention": info})), encoding="utf-8")
    return path

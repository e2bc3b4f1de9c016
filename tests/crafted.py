"""Small valid-looking files whose views would cost without bound, made in the test (never stored)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np

from explorer_core.attnstore import AttentionWriter, Shape, pooling_edges
from explorer_core.trace import (
    AttentionInfo,
    Candidates,
    Components,
    Explanation,
    InputScores,
    StepRecord,
    TokenRef,
    Trace,
)


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


def _npy_header(shape: tuple[int, ...], dtype: str) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def write_v1(path: Path, layers: int, heads: int, t: int, steps: int) -> None:
    """A schema-1 npz streamed to disk: prompt row q of every head is (q % 7) / 8; step s's row of
    (layer, head) is the constant ((layer * heads + head) * steps + s) % 97 / 128."""
    prompt = lambda: (np.full(t, (q % 7) / 8, np.float16) for _ in range(layers * heads) for q in range(t))  # noqa: E731
    value = lambda lh, s: ((lh * steps + s) % 97) / 128  # noqa: E731
    rows = lambda: (np.full(t + s, value(lh, s), np.float16) for lh in range(layers * heads) for s in range(steps))  # noqa: E731
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, make, n in (("prompt", prompt, layers * heads * t * t),
                              ("rows", rows, layers * heads * sum(t + s for s in range(steps)))):  # fmt: skip
            with zf.open(name + ".npy", "w", force_zip64=True) as fh:
                fh.write(_npy_header((2, n), "|u1"))
                for plane in (0, 1):
                    for arr in make():
                        fh.write(arr.view(np.uint8)[plane::2].tobytes())
        with zf.open("lengths.npy", "w") as fh:
            fh.write(_npy_header((steps,), "<i8") + (np.arange(steps, dtype=np.int64) + t).tobytes())


def explanation(
    layers: int, heads: int, value: float = 0.0, width: int | None = None, step: int = 0, methods: dict | None = None
) -> Explanation:
    """A kept explanation of a (layers, heads) model at `step`, every head's part `value`; `width` gives
    the first layer's row another length (a breakdown of the wrong shape)."""
    rows = [[value] * (width if width is not None and i == 0 else heads) for i in range(layers)]
    return Explanation(
        step=step, target=TokenRef(id=1, label="a"), contrast=TokenRef(id=2, label="b"),
        logit_diff=value * layers * heads,
        inputs=InputScores(positions=[0], labels=["x"], methods=methods or {}, baseline="pad", ig_steps=1),
        components=Components(embed=0.0, heads=rows, mlps=[0.0] * layers, attn_bias=[0.0] * layers, bias=0.0),
        checks={}, timing_s={},
    )  # fmt: skip

"""Trace data -> tidy pandas DataFrames, the only input the chart builders take.

Token text only ever lands in data columns (`label`, `q_name`, `k_name`), never in field names,
so a token like `<img onerror=...>` or `**` is just a value to every renderer.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .trace import Explanation, StepRecord, Trace

DIST_NAMES = {"raw": "raw model", "proc": "after processing"}


def _names(labels: list[str], ids: list[int]) -> list[str]:
    """Unique display names: a label seen twice gets its token id appended."""
    seen: dict[str, int] = {}
    for lab in labels:
        seen[lab] = seen.get(lab, 0) + 1
    return [lab if seen[lab] == 1 else f"{lab} #{i}" for lab, i in zip(labels, ids)]


def topk_frame(step: StepRecord) -> pd.DataFrame:
    """One row per (distribution, candidate): rank, token, probability, chosen or not (see `topk_rows`)."""
    return pd.DataFrame(topk_rows(step), columns=["distribution", "rank", "token_id", "label", "prob", "chosen"])


def topk_rows(step: StepRecord) -> list[dict]:
    """The rows of `topk_frame` as plain dicts (the HTML export writes one list per step).

    When the chosen token is outside a distribution's logged top candidates it is added as one more
    row at the bottom, so the chart always shows what was picked.
    """
    rows = []
    for key, c, p in (("raw", step.top_raw, step.p_raw), ("proc", step.top_proc, step.p_proc)):
        dist = DIST_NAMES[key]
        for rank, (tid, label, prob) in enumerate(zip(c.ids, _names(list(c.labels), list(c.ids)), c.probs), 1):
            rows.append(
                {
                    "distribution": dist,
                    "rank": rank,
                    "token_id": tid,
                    "label": label,
                    "prob": prob,
                    "chosen": tid == step.token_id,
                }
            )
        if step.token_id not in c.ids:
            rows.append(
                {
                    "distribution": dist,
                    "rank": len(c.ids) + 1,
                    "token_id": step.token_id,
                    "label": step.label + " (chosen)",
                    "prob": p,
                    "chosen": True,
                }
            )
    return rows


def step_columns(trace: Trace) -> pd.DataFrame:
    """One row per step: the per-step figures every table and timeline starts from."""
    steps = trace.steps
    return pd.DataFrame(
        {
            "step": [s.step for s in steps],
            "label": [s.label for s in steps],
            "p_raw": [s.p_raw for s in steps],
            "p_proc": [s.p_proc for s in steps],
            "entropy_raw": [s.entropy_raw for s in steps],
            "entropy_proc": [s.entropy_proc for s in steps],
            "rank": [s.rank_raw for s in steps],
        }
    )


def timeline_frame(trace: Trace) -> pd.DataFrame:
    """Per-step figures in long form: step, label, metric, value."""
    wide = step_columns(trace).rename(
        columns={
            "p_raw": "p(chosen), raw",
            "p_proc": "p(chosen), processed",
            "entropy_raw": "entropy raw (bits)",
            "entropy_proc": "entropy processed (bits)",
            "rank": "raw rank",
        }
    )
    long = wide.melt(id_vars=["step", "label"], var_name="series", value_name="value")
    panel = {
        "p(chosen), raw": "probability",
        "p(chosen), processed": "probability",
        "entropy raw (bits)": "entropy (bits)",
        "entropy processed (bits)": "entropy (bits)",
        "raw rank": "rank of chosen",
    }
    long["panel"] = long["series"].map(panel)
    return long


def stream_frame(trace: Trace) -> pd.DataFrame:
    """The token table: step, token and the chosen token's figures."""
    cols = step_columns(trace).rename(columns={"label": "token", "entropy_raw": "entropy"})
    return cols[["step", "token", "p_raw", "p_proc", "rank", "entropy"]]


def shade(p_raw: float) -> float:
    """Background opacity for a token in a stream: the less likely under the raw model, the stronger."""
    return 0.08 + 0.62 * (1.0 - p_raw)


STAGE_NAMES = {
    "raw": "raw",
    "repetition": "repetition penalty",
    "no_repeat_ngram": "no-repeat n-gram",
    "block_eos": "EOS blocking",
    "block_ws": "whitespace blocking",
    "temperature": "temperature",
    "top_k": "top-k",
    "top_p": "top-p",
}


def stage_frame(step: StepRecord, max_candidates: int = 10) -> pd.DataFrame:
    """Tracked candidates' probability after each stage, long form; the raw top few, the chosen token
    and EOS are kept so the chart stays readable."""
    tr = step.stages
    if tr is None:
        return pd.DataFrame(columns=["stage", "stage_index", "label", "token_id", "prob", "chosen"])
    raw = tr.probs[0]
    order = sorted(range(len(tr.ids)), key=lambda i: -raw[i])[:max_candidates]
    keep = list(dict.fromkeys(order + [i for i, t in enumerate(tr.ids) if t == step.token_id] + [len(tr.ids) - 1]))
    names = _names([tr.labels[i] for i in keep], [tr.ids[i] for i in keep])
    rows = []
    for si, stage in enumerate(tr.stages):
        for name, i in zip(names, keep):
            rows.append(
                {
                    "stage": STAGE_NAMES.get(stage, stage),
                    "stage_index": si,
                    "label": name,
                    "token_id": tr.ids[i],
                    "prob": tr.probs[si][i],
                    "chosen": tr.ids[i] == step.token_id,
                }
            )
    return pd.DataFrame(rows)


def stage_summary(step: StepRecord) -> pd.DataFrame:
    """Per tracked candidate: raw and final probability, and the rule that removed it or moved it most."""
    tr = step.stages
    if tr is None:
        return pd.DataFrame(columns=["token", "token_id", "p raw", "p final", "verdict"])
    rows = []
    for i, tid in enumerate(tr.ids):
        col = [tr.probs[s][i] for s in range(len(tr.stages))]
        rows.append(
            {
                "token": tr.labels[i],
                "token_id": tid,
                "p raw": col[0],
                "p final": col[-1],
                "verdict": _stage_verdict(tr.stages, col, tid == step.token_id),
            }
        )
    return pd.DataFrame(rows).sort_values("p raw", ascending=False, ignore_index=True)


def _stage_verdict(stages: list[str], col: list[float], chosen: bool) -> str:
    """The rule that removed the candidate, and the rule that moved it most when that is another one
    (a penalty can cut 0.44 to 0.03 before top-p removes the rest: both are named)."""
    prefix = "chosen; " if chosen else ""
    if col[0] == 0:
        return f"{prefix}impossible under the raw model"
    if len(col) == 1:
        return f"{prefix}no rules active"
    name = [STAGE_NAMES.get(st, st) for st in stages]
    moves = [col[s] - col[s - 1] for s in range(1, len(col))]
    big = max(range(len(moves)), key=lambda j: abs(moves[j])) + 1  # stage with the largest change
    removed = next((s for s in range(1, len(col)) if col[s - 1] > 0 and col[s] == 0), None)
    most = f"changed most by {name[big]} ({col[big - 1]:.3f} → {col[big]:.3f})"
    if removed is None:
        return prefix + most
    if removed == big:
        return f"{prefix}removed by {name[removed]} ({col[removed - 1]:.3f} → 0)"
    return f"{prefix}removed by {name[removed]} ({col[removed - 1]:.3f} → 0); {most}"


def lens_frame(trace: Trace, center: int, window: int = 24) -> pd.DataFrame:
    """Layers × steps: each layer's top token and its probability, for steps around `center`."""
    lo = max(0, min(center - window // 2, len(trace.steps) - window))
    rows = []
    for s in trace.steps[lo : lo + window]:
        if s.lens is None:
            continue
        for layer, (lab, p, pc) in enumerate(zip(s.lens.top_labels, s.lens.top_probs, s.lens.chosen_probs)):
            rows.append({"step": s.step, "layer": layer, "top": lab, "p_top": p, "p_chosen": pc, "chosen": s.label})
    return pd.DataFrame(rows, columns=["step", "layer", "top", "p_top", "p_chosen", "chosen"])


def lens_step_frame(step: StepRecord) -> pd.DataFrame:
    if step.lens is None:
        return pd.DataFrame(columns=["layer", "p_chosen", "top", "p_top"])
    lens = step.lens
    return pd.DataFrame(
        {
            "layer": range(len(lens.chosen_probs)),
            "p_chosen": lens.chosen_probs,
            "top": lens.top_labels,
            "p_top": lens.top_probs,
        }
    )


def commit_layer(step: StepRecord) -> int | None:
    """The first layer from which the chosen token is the lens's top token through the last layer.

    None without a lens, or when the token is not the lens's top at the last layer (the last layer is
    the model's own distribution, so that means the sampling rules picked a lower-ranked token)."""
    lens = step.lens
    if lens is None or lens.top_ids[-1] != step.token_id:
        return None
    layer = len(lens.top_ids) - 1
    while layer > 0 and lens.top_ids[layer - 1] == step.token_id:  # walk down while it stays top
        layer -= 1
    return layer


def _commit_text(step: StepRecord, layer: int | None) -> str:
    if step.lens is None:
        return "no lens recorded"
    last = len(step.lens.top_ids) - 1
    if layer is None:
        return f"never: not the lens's top at the last layer ({last})"
    return f"layer {layer} of 0–{last}"


def commitment_frame(trace: Trace) -> pd.DataFrame:
    """Per step: the layer the chosen token became the lens's top and stayed so (`commit`, nullable),
    the lens's layer count, the raw rank, whether the sampling rules chose the token (raw rank > 1),
    and the commit layer in words for a tooltip."""
    rows = []
    for s in trace.steps:
        layer = commit_layer(s)
        rows.append(
            {
                "step": s.step,
                "label": s.label,
                "commit": layer,
                "n_layers": len(s.lens.top_ids) if s.lens is not None else trace.model.n_layers,
                "rank_raw": s.rank_raw,
                "rules_chose": s.rank_raw > 1,
                "has_lens": s.lens is not None,
                "commit_text": _commit_text(s, layer),
            }
        )
    cols = ["step", "label", "commit", "n_layers", "rank_raw", "rules_chose", "has_lens", "commit_text"]
    return pd.DataFrame(rows, columns=cols).astype({"commit": "Int64"})


# -- uncertainty lane and explanations ---------------------------------------------------------------
# Torn: the model's own distribution was spread out (raw entropy at least TORN_ENTROPY bits) and the
# sampler faced a near tie (the two best processed candidates within TORN_MARGIN of each other).
TORN_ENTROPY = 1.0
TORN_MARGIN = 0.10
METHOD_NAMES = {
    "grad_x_input": "gradient × input",
    "attn_lrp": "attention-aware LRP",
    "integrated_gradients": "integrated gradients",
}


def margin(step: StepRecord) -> float:
    """Probability gap between the two best processed candidates (the best one's probability if it stood alone)."""
    probs = step.top_proc.probs
    return probs[0] - (probs[1] if len(probs) > 1 else 0.0) if probs else 0.0


def is_torn(step: StepRecord) -> bool:
    return step.entropy_raw >= TORN_ENTROPY and margin(step) <= TORN_MARGIN


def uncertainty_frame(trace: Trace) -> pd.DataFrame:
    """Per step: entropy, varentropy (None for older traces), surprisal of the chosen token, top-two margin, torn."""
    rows = []
    for s in trace.steps:
        rows.append(
            {
                "step": s.step,
                "label": s.label,
                "entropy": s.entropy_raw,
                "varentropy": s.varentropy,
                "surprisal": -np.log2(max(s.p_raw, 1e-45)),
                "margin": margin(s),
                "torn": is_torn(s),
            }
        )
    cols = ["step", "label", "entropy", "varentropy", "surprisal", "margin", "torn"]
    return pd.DataFrame(rows, columns=cols)


def attribution_frame(expl: Explanation) -> pd.DataFrame:
    """One row per (method, position): score, its rank by size within the method, and 'position: label'."""
    parts = []
    for method, scores in expl.inputs.methods.items():
        frame = pd.DataFrame(
            {
                "method": method,
                "method_name": METHOD_NAMES.get(method, method),
                "position": expl.inputs.positions,
                "label": expl.inputs.labels,
                "score": scores,
            }
        )
        # the axis name is clipped (the full label stays in `label`, the tooltip's): a long token once
        # widened the chart past its column
        frame["name"] = [f"{p}: {_clip_label(lab)}" for p, lab in zip(frame["position"], frame["label"])]
        frame["rank"] = frame["score"].abs().rank(ascending=False, method="first").astype(int)
        parts.append(frame)
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["method", "position", "score"])


AXIS_LABEL_CHARS = 10  # characters of a token label on an attribution chart's axis


def _clip_label(label: str) -> str:
    return label if len(label) <= AXIS_LABEL_CHARS else label[: AXIS_LABEL_CHARS - 1] + "…"


def method_sums_frame(expl: Explanation) -> pd.DataFrame:
    """Per attribution method: its scores' sum against the logit difference it explains.

    Only integrated gradients is complete by construction (its sum is f(input) - f(baseline), so it differs
    from the logit difference by f(baseline)); LRP is nearly so; gradient × input is a local slope and its
    sum may be anything. Showing the sums side by side tells which ranking adds up to the difference."""
    rows = []
    for method, scores in expl.inputs.methods.items():
        total = float(sum(scores))
        rows.append(
            {
                "method": METHOD_NAMES.get(method, method),
                "sum of scores": total,
                "logit difference": expl.logit_diff,
                "sum / difference": total / expl.logit_diff if abs(expl.logit_diff) > 1e-9 else None,
            }
        )
    return pd.DataFrame(rows, columns=["method", "sum of scores", "logit difference", "sum / difference"])


def named_components(expl: Explanation) -> list[dict]:
    """Every part of the breakdown: name, layer and head (None where it has none) and its logit amount."""
    c = expl.components
    parts = [
        {"component": "embedding", "layer": None, "head": None, "amount": c.embed},
        {"component": "biases", "layer": None, "head": None, "amount": c.bias + sum(c.attn_bias)},
    ]
    parts += [
        {"component": f"L{layer} H{head}", "layer": layer, "head": head, "amount": v}
        for layer, row in enumerate(c.heads)
        for head, v in enumerate(row)
    ]
    parts += [
        {"component": f"L{layer} MLP", "layer": layer, "head": None, "amount": v} for layer, v in enumerate(c.mlps)
    ]
    return parts


def top_components_frame(expl: Explanation, n: int = 10) -> pd.DataFrame:
    """The n largest parts by size: their logit amount and their share (amount / logit difference).

    Amount and share differ: +2.66 of a 4.13 difference is a share of 0.64. Parts of opposite signs
    cancel, so shares can pass 1 or go below 0. No share when the difference is (nearly) zero."""
    parts = sorted(named_components(expl), key=lambda r: abs(r["amount"]), reverse=True)[:n]
    diff = expl.logit_diff
    for r in parts:
        r["share"] = r["amount"] / diff if abs(diff) > 1e-9 else None
    cols = ["component", "amount", "share", "layer", "head"]
    return pd.DataFrame(parts, columns=cols).astype({"layer": "Int64", "head": "Int64"})


def components_frame(expl: Explanation) -> pd.DataFrame:
    """Layers x (heads, then an MLP column), long form: layer, column, order, value."""
    c = expl.components
    rows = [
        {"layer": layer, "column": f"H{head}", "order": head, "value": v}
        for layer, row in enumerate(c.heads)
        for head, v in enumerate(row)
    ]
    width = len(c.heads[0]) if c.heads else 0
    rows += [{"layer": layer, "column": "MLP", "order": width + 1, "value": v} for layer, v in enumerate(c.mlps)]
    return pd.DataFrame(rows, columns=["layer", "column", "order", "value"])


def outcome_frame(record) -> pd.DataFrame:
    """An intervention's top-k before and after, side by side by rank."""
    b, a = record.before.top, record.after.top
    rows = [
        {
            "rank": i + 1,
            "before": b.labels[i] if i < len(b.ids) else "",
            "p before": b.probs[i] if i < len(b.ids) else None,
            "after": a.labels[i] if i < len(a.ids) else "",
            "p after": a.probs[i] if i < len(a.ids) else None,
        }
        for i in range(max(len(b.ids), len(a.ids)))
    ]
    return pd.DataFrame(rows, columns=["rank", "before", "p before", "after", "p after"])


def sweep_frame(sweep, predicted: bool = False) -> pd.DataFrame:
    """A sweep's measured (or predicted) changes in components_frame's long form: layer, column, order, value."""
    heads = sweep.predicted_heads if predicted else sweep.heads
    mlps = sweep.predicted_mlps if predicted else sweep.mlps
    rows = [
        {"layer": layer, "column": f"H{head}", "order": head, "value": v}
        for layer, row in zip(sweep.layers, heads or [], strict=False)
        for head, v in enumerate(row)
    ]
    width = len(heads[0]) if heads else 0
    rows += [
        {"layer": layer, "column": "MLP", "order": width + 1, "value": v} for layer, v in zip(sweep.layers, mlps or [])
    ]
    return pd.DataFrame(rows, columns=["layer", "column", "order", "value"])


def sweep_limit(sweep) -> float:
    """The largest magnitude of a sweep's measured and predicted values: one colour scale for both heatmaps."""
    values = [abs(v) for row in sweep.heads + (sweep.predicted_heads or []) for v in row]
    values += [abs(v) for v in sweep.mlps + (sweep.predicted_mlps or [])]
    return max(values, default=0.0) or 1.0


def sweep_ranking(sweep, n: int = 10) -> pd.DataFrame:
    """The `n` parts whose change moved the logit difference most, with the prediction beside it."""
    rows = []
    pred_h, pred_m = sweep.predicted_heads, sweep.predicted_mlps
    for i, layer in enumerate(sweep.layers):
        for h, v in enumerate(sweep.heads[i]):
            rows.append({"part": f"{layer}.{h}", "measured": v, "predicted": pred_h[i][h] if pred_h else None})
        if sweep.mlps:
            rows.append({"part": f"{layer}.mlp", "measured": sweep.mlps[i], "predicted": pred_m[i] if pred_m else None})
    frame = pd.DataFrame(rows, columns=["part", "measured", "predicted"])
    return frame.reindex(frame["measured"].abs().sort_values(ascending=False).index).head(n)


def fidelity_frame(trace: Trace) -> pd.DataFrame:
    """One row per feature the model's fidelity check measured: result, figure, tolerance, what was compared."""
    info = trace.fidelity
    rows = [
        {
            "feature": c.feature,
            "result": "exact" if c.ok else "refused",
            "measured": c.figure,
            "tolerance": c.tolerance,
            "compared": c.detail,
        }
        for c in (info.checks if info is not None else [])
    ]
    return pd.DataFrame(rows, columns=["feature", "result", "measured", "tolerance", "compared"])


def fidelity_caption(trace: Trace) -> str:
    info = trace.fidelity
    if info is None:
        return "This trace was made before the fidelity check existed (or by a tool that does not run it)."
    windows = ", ".join(map(str, info.windows)) or "none"
    way = {"own": "the model's own eager attention function", "fast": "a fast copy proven equal to it"}
    source = way.get(info.way or "", "not recorded")
    return (
        f"Checked when these weights were first loaded, on a {info.probe_tokens}-token probe and {info.new_tokens} "
        f"greedy steps (attention windows: {windows}; the check took {info.seconds:.1f} s then, later loads read "
        "its result back), against transformers' generate(), eager output_attentions and the model's own logits. "
        f"Recorded attention comes from {source}."
    )

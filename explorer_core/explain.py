"""Why this token: input attribution and an exact component breakdown of one step's logit difference.

For step N of a trace the explained quantity is f = logit[target] - logit[contrast] at the last position
of the sequence prompt + tokens 0..N-1, recomputed on request with one uncached (teacher-forced) forward;
nothing here runs during generation.

- Input attribution: gradient x input (Captum); attention-aware LRP (explorer_core.lrp: one backward
  with AttnLRP's rules); and integrated gradients along a straight path from a baseline (see BASELINE),
  adaptive so that its scores add up to f(input) - f(baseline) (see integrated_gradients). Scores are
  summed over the embedding dimension, one per position; IG's completeness error and LRP's sum are
  reported with them. IG is written here, not taken from Captum, because its nodes are placed by the
  path's own roughness (Captum's IntegratedGradients offers fixed node rules only).
- Component breakdown: the final residual at the last position is the embedding plus every attention
  block's output plus every MLP's output (pre-norm transformers). With the final norm's scale frozen at
  its actual value the logit difference is linear in that residual, so it splits exactly into the
  embedding, each head (its slice of the output projection's input times that slice of the projection),
  each MLP, and the constant biases. Read from the same forward by hooks on each output projection and MLP.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from . import lrp
from .frames import METHOD_NAMES
from .models import LoadedModel
from .tokens import vocab_for
from .trace import Components, Explanation, InputScores, StepRecord, TokenRef, Trace

METHODS = ("grad_x_input", "attn_lrp", "integrated_gradients")
FAST_METHODS = ("grad_x_input", "attn_lrp")  # one backward each: what Explain runs unless asked for more
IG_STEPS = 256  # most gradient evaluations one explanation may spend (the adaptive rule usually stops sooner)
IG_TOLERANCE = 0.04  # stop refining when the intervals' errors add up to 4 % of f(x) - f(base)
IG_PIECES = 8  # intervals of the path parameter to start with, two gradient evaluations each
IG_SPLITS_PER_ROUND = 8  # intervals halved per round: batches the new gradients
IG_TOKENS_PER_BATCH = 2048  # interpolation points x positions per backward pass: bounds memory at long prompts
# IG's baseline: zero token embeddings at every position but the first. Models park attention on the first
# token, and moving it made the path too rough to integrate; a filler token (EOS) instead of zeros gave a
# rough path too (measured on the default model). RMSNorm turns the start of the zero path into a steep
# step, so the path is integrated in t with alpha = t**IG_WARP, which packs the nodes near zero.
BASELINE = "zero embeddings at every position but the first, which keeps its own token"
IG_WARP = 3.0
SUM_TOLERANCE = 1e-2  # the parts must rebuild the logit difference this closely, or the model is refused


class ExplainError(ValueError):
    """A step cannot be explained; the message names the problem and what to do."""


class Cancelled(ExplainError):
    """An explanation stopped between two passes: its caller asked (a closed session, a time limit)."""


# `cancel` is asked before every forward or backward pass: falsy to go on, else the reason to stop (a
# threading.Event's is_set works). A caller may also raise from it (Streamlit's Stop does).
Cancel = Callable[[], object] | None


class _Passes:
    """Counts passes and asks `cancel` before each, so a shared model is never held past a stop request."""

    def __init__(self, cancel: Cancel = None) -> None:
        self.cancel, self.done = cancel, 0

    def __call__(self) -> None:
        reason = self.cancel() if self.cancel is not None else None
        if reason:
            why = reason if isinstance(reason, str) else "cancelled by its caller"
            raise Cancelled(f"explanation stopped after {self.done} model passes: {why}")
        self.done += 1


@dataclass
class Parts:
    """The modules the breakdown hooks, found by name on llama-like and GPT-2 models."""

    blocks: list
    out_proj: list  # per block: the attention's output projection (nn.Linear or GPT-2's Conv1D)
    mlps: list
    final_norm: torch.nn.Module
    n_heads: int
    transposed: bool  # Conv1D stores (in, out); nn.Linear stores (out, in)


_BLOCKS = ("layers", "h", "blocks")
_ATTENTIONS = ("self_attn", "attn", "attention", "self_attention")
_PROJECTIONS = ("o_proj", "c_proj", "dense", "out_proj")
_MLPS = ("mlp", "feed_forward", "block_sparse_moe", "ffn")


def find_parts(model) -> Parts:
    """Locate blocks, output projections, MLPs and the final norm, or say what is missing.

    Found by the names transformers' decoder-only models use; whether the parts really add up to the
    residual stream (sequential or parallel attention and MLP, no norm after either) is proven on every
    explanation by the breakdown's own check, which refuses the model otherwise.
    """
    from .lens import final_norm, inner_model

    base = inner_model(model) or model
    blocks = next((getattr(base, a) for a in _BLOCKS if isinstance(getattr(base, a, None), torch.nn.ModuleList)), None)
    name = type(model).__name__
    try:
        norm = final_norm(model)
    except ValueError:
        norm = None
    expected = "explanations need decoder blocks with an attention output projection and an MLP, and a final norm"
    if blocks is None or norm is None:
        raise ExplainError(f"{name} has no list of decoder blocks or no final norm where expected: {expected}")
    out_proj, mlps = [], []
    for i, block in enumerate(blocks):
        attn = next((getattr(block, a) for a in _ATTENTIONS if getattr(block, a, None) is not None), None)
        proj = next((getattr(attn, p) for p in _PROJECTIONS if getattr(attn, p, None) is not None), None)
        mlp = next((getattr(block, a) for a in _MLPS if getattr(block, a, None) is not None), None)
        if proj is None or mlp is None:
            raise ExplainError(
                f"{name} block {i} has no attention output projection or no MLP (a layer without attention, "
                f"or another layout): {expected}"
            )
        out_proj.append(proj)
        mlps.append(mlp)
    n_heads = int(model.config.num_attention_heads)
    transposed = type(out_proj[0]).__name__ == "Conv1D"
    width = out_proj[0].weight.shape[0 if transposed else 1]
    if width % n_heads:
        raise ExplainError(f"{name}: output projection input width {width} is not a multiple of {n_heads} heads")
    return Parts(list(blocks), out_proj, mlps, norm, n_heads, transposed)


def resolve_contrast(lm: LoadedModel, step: StepRecord, contrast: int | str | None) -> int:
    """The contrast token id: the best other processed candidate by default, else an id or one typed token.

    Typed text is taken exactly as typed, leading space included: " Paris" and "Paris" are different
    tokens, and stripping the space once explained against the wrong one."""
    if contrast is None:
        others = [i for i in step.top_proc.ids + step.top_raw.ids if i != step.token_id]
        if not others:
            raise ExplainError(f"step {step.step} recorded no candidate besides the chosen one: give a contrast token")
        return others[0]
    # ASCII digits only: str.isdigit() takes "٣" (Arabic-Indic three), which int() reads as id 3
    if isinstance(contrast, int) or (
        isinstance(contrast, str) and contrast.strip().isascii() and contrast.strip().isdigit()
    ):
        token = int(contrast)
    else:
        token = token_for_text(lm, contrast)
    if not 0 <= token < lm.vocab_size:
        raise ExplainError(f"contrast id {token} is outside the vocabulary (0..{lm.vocab_size - 1})")
    if token == step.token_id:
        raise ExplainError(f"contrast {contrast!r} is the chosen token itself: pick a different token")
    return token


def token_for_text(lm: LoadedModel, text: str) -> int:
    """The one token whose text is exactly `text`.

    Encoding alone is not enough: a SentencePiece tokenizer adds its own leading "▁" (so "Paris" encodes
    to the token for " Paris"), and " Paris" may encode to "▁" + "▁Paris". So the encoding is taken only
    when its single token's bytes are the text; otherwise the vocabulary is searched for those bytes."""
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    vocab = vocab_for(lm.tokenizer)
    want = text.encode("utf-8")
    if len(ids) == 1 and vocab.bytes_of(int(ids[0])) == want:
        return int(ids[0])
    exact = next((i for i in range(len(vocab)) if i not in vocab.special and vocab.bytes_of(i) == want), None)
    if exact is not None:
        return exact
    if len(ids) == 1:  # the tokenizer's own reading (its added prefix space): the label shown names it
        return int(ids[0])
    raise ExplainError(
        f"contrast {text!r} is {len(ids)} tokens for this tokenizer: type exactly one token "
        "(its text as the model writes it, leading space included) or give its id"
    )


def sequence_for(lm: LoadedModel, trace: Trace, step: int, branch: int = 0) -> tuple[list[int], StepRecord]:
    """Token ids the model saw before step `step` (prompt + earlier tokens) and that step's record."""
    steps = trace.path_steps(branch)
    if not 0 <= step < len(steps):
        raise ExplainError(f"step {step} is out of range: this path has steps 0..{len(steps) - 1}")
    if lm.vocab_size != trace.model.vocab_size:
        raise ExplainError(
            f"the loaded model's vocabulary has {lm.vocab_size} tokens but the trace's has "
            f"{trace.model.vocab_size}: explain with the model that made it ({trace.model.name})"
        )
    ids = list(trace.prompt_ids) + [s.token_id for s in steps[:step]]
    lm.check_fits(len(ids), f"explaining step {step}")
    return ids, steps[step]


def explain(
    lm: LoadedModel,
    trace: Trace,
    step: int,
    contrast: int | str | None = None,
    branch: int = 0,
    methods: Sequence[str] = METHODS,
    ig_steps: int = IG_STEPS,
    cancel: Cancel = None,
) -> Explanation:
    """Explain why step `step` chose its token over `contrast` (default: the best other processed candidate).

    `cancel` is asked before every pass (see Cancel); a stop raises Cancelled and keeps nothing."""
    passes = _Passes(cancel)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ExplainError(f"unknown attribution method {bad[0]!r}: choose from {', '.join(METHODS)}")
    parts = find_parts(lm.model)
    ids, record = sequence_for(lm, trace, step, branch)
    target, other = record.token_id, resolve_contrast(lm, record, contrast)
    input_ids = torch.tensor([ids], device=lm.device)  # (1, T)
    timing: dict[str, float] = {}
    vocab = vocab_for(lm.tokenizer)
    start = time.perf_counter()
    passes()
    try:
        comps, logit_diff, checks = breakdown(lm.model, parts, input_ids, target, other)
    except ExplainError:
        raise
    except (RuntimeError, TypeError, IndexError, AttributeError, ValueError) as exc:  # a layout the hooks cannot read
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ExplainError(
            f"{type(lm.model).__name__}: the breakdown cannot read this architecture's blocks "
            f"({type(exc).__name__}: {first}), so an exact breakdown is not available"
        ) from exc
    timing["components"] = time.perf_counter() - start
    scores: dict[str, list[float]] = {}
    spent = 0  # integrated gradients' gradient evaluations
    for method in methods:
        start = time.perf_counter()
        values, error, used = attribute(lm.model, input_ids, target, other, method, ig_steps, passes)
        timing[method] = time.perf_counter() - start
        scores[method] = values
        if error is not None:
            checks[f"{method}_completeness_error"] = error
            spent = used
        if method == "attn_lrp":  # AttnLRP is not exactly conservative (the softmax keeps a share): shown
            checks["attn_lrp_sum"] = sum(values)
    labels = list(trace.prompt_labels) + [s.label for s in trace.path_steps(branch)[:step]]
    return Explanation(
        step=step,
        branch=branch,
        target=TokenRef(id=target, label=vocab.label(target)),
        contrast=TokenRef(id=other, label=vocab.label(other)),
        logit_diff=logit_diff,
        inputs=InputScores(
            positions=list(range(len(ids))),
            labels=labels,
            methods=scores,
            baseline=BASELINE,
            ig_steps=max(1, spent),
        ),
        components=comps,
        checks=checks,
        timing_s=timing,
    )


def _unembed_direction(model, target: int, other: int) -> tuple[torch.Tensor, float]:
    """(d,) difference of the two tokens' output rows, and the output head's bias difference (0 if none)."""
    head = model.get_output_embeddings()
    w = head.weight.detach().float()
    bias = getattr(head, "bias", None)
    b = float(bias[target] - bias[other]) if bias is not None else 0.0
    return w[target] - w[other], b


def _frozen_norm(norm: torch.nn.Module, x: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Direction u with component·u = that component's share of the logit difference, and the norm bias's share.

    x: (d,) the residual entering the final norm; d: (d,) unembedding difference. The norm's scale is
    frozen at its value for x, which makes the map from residual to logit difference linear. Which
    formula the norm follows (LayerNorm or RMSNorm; scale w, 1 + w as in Gemma, or none as in OLMo) is
    not assumed from its name: each is tried and the one that reproduces the norm's own output on x is used.
    """
    centred, scale, bias, inv = norm_form(norm, x)
    v = scale * d
    share = float(bias @ d) if isinstance(bias, torch.Tensor) else 0.0
    return ((v - v.mean()) if centred else v) * inv, share  # centring folded into the direction


def norm_form(norm: torch.nn.Module, x: torch.Tensor) -> tuple[bool, torch.Tensor | float, torch.Tensor | float, float]:
    """(centred, scale, bias, inv): the formula the norm follows on x, y = scale·h·inv + bias with
    h = x − mean(x) when centred, and inv its 1/rms at x. Holding inv at this value freezes the norm's
    scale (the breakdown's linearisation; interventions that freeze the final norm use the same form)."""
    with torch.no_grad():
        y = norm(x[None].to(_dtype(norm)))[0].float()
    eps = _eps(norm)
    for centred, scale, bias in _norm_forms(norm):
        h = x - x.mean() if centred else x
        inv = torch.rsqrt(h.pow(2).mean() + eps)
        if torch.allclose(scale * h * inv + bias, y, atol=1e-4 * max(1.0, float(y.abs().max())), rtol=1e-3):
            return centred, scale, bias, float(inv)
    raise ExplainError(
        f"final norm {type(norm).__name__} is not a LayerNorm or RMSNorm with scale w, 1 + w or none "
        "(tried each against its own output): an exact breakdown is not available"
    )


def _norm_forms(norm) -> list[tuple[bool, torch.Tensor | float, torch.Tensor | float]]:
    """(centred, scale, bias) candidates for a final norm."""
    w = getattr(norm, "weight", None)
    b = getattr(norm, "bias", None)
    w = w.detach().float() if isinstance(w, torch.Tensor) else None
    b = b.detach().float() if isinstance(b, torch.Tensor) else 0.0
    scales = [s for s in (w, None if w is None else 1.0 + w) if s is not None] or [1.0]
    return [(centred, s, b) for centred in (True, False) for s in scales]


def _eps(norm) -> float:
    for name in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(norm, name, None)
        if isinstance(value, float):
            return value
    return 1e-5


def _dtype(module) -> torch.dtype:
    return next((p.dtype for p in module.parameters()), torch.float32)


@torch.inference_mode()
def breakdown(
    model, parts: Parts, input_ids: torch.Tensor, target: int, other: int, directions: dict | None = None
) -> tuple[Components, float, dict[str, float]]:
    """One hooked forward: the logit difference at the last position and its exact split.

    Nothing about the layout is assumed from names; each step is checked against the model's own numbers:
    - after the head: the model's logits are the head's times a constant (Cohere, Granite) or soft-capped
      (Gemma 2); a soft-capped difference is split before the cap, which the checks state;
    - each block adds α·attention + β·MLP to the residual, with α, β fitted to the block's own increment
      (1 for most models; Granite's residual multiplier), where attention or MLP may pass through a norm
      of their own first (Gemma 2/3, OLMo 2 sandwich norms), frozen at its scale as the final norm is;
    - the parts must rebuild the residual and the difference, or the model is refused.

    `directions`, when given, receives the linear map behind every share: "resid" (d,) for the residual
    stream at the last position, and per layer "heads" (H·dh,) for the output projection's input and
    "mlps" (d,) for the MLP's output, so a change δ of a part predicts a change δ·direction of the
    difference (its direct effect), and the last position's clean values ("z", "mlp", "hidden").
    """
    last = _capture(model, parts, input_ids)
    c, cap = _after_head(model, last)
    raw_diff = float(last["raw"][target] - last["raw"][other])
    logit_diff = c * raw_diff  # split before any soft-cap
    d, head_bias = _unembed_direction(model, target, other)
    u, norm_bias = _frozen_norm(parts.final_norm, last["norm_in"], c * d)
    embed = float(last["embed"] @ u)
    heads, mlps, attn_bias, rebuilt = [], [], [], last["embed"].clone()
    for layer, proj in enumerate(parts.out_proj):
        a, m, u_a, b_a, u_m = _block_terms(model, last, layer, u)
        w = proj.weight.detach().float()
        w_in_out = w if parts.transposed else w.T  # (H*dh, d)
        z = last["z"][layer]  # (H*dh,) the projection's input at the last position
        per_head = (z.view(parts.n_heads, -1) * (w_in_out @ u_a).view(parts.n_heads, -1)).sum(-1)  # (H,)
        if directions is not None:
            directions.setdefault("heads", []).append(w_in_out @ u_a)
            directions.setdefault("mlps", []).append(u_m)
        heads.append(per_head.tolist())
        attn_bias.append((float(proj.bias.detach().float() @ u_a) if proj.bias is not None else 0.0) + b_a)
        mlps.append(float(m @ u))
        rebuilt += a + m
    bias = norm_bias + c * head_bias
    total = embed + sum(map(sum, heads)) + sum(mlps) + sum(attn_bias) + bias
    resid_error = float((rebuilt - last["norm_in"]).abs().max() / last["norm_in"].abs().max().clamp_min(1e-12))
    if abs(total - logit_diff) > SUM_TOLERANCE * max(1.0, abs(logit_diff)) or resid_error > 1e-3:
        raise ExplainError(
            f"{type(model).__name__}: the hooked parts do not rebuild the logit difference ({total:.4f} vs "
            f"{logit_diff:.4f}; the residual rebuilt from them misses by {resid_error:.1e} of its size), so an "
            "exact breakdown is not available"
        )
    if directions is not None:
        directions.update(resid=u, z=last["z"], mlp=last["mlp"], hidden=last["hidden"])
    comps = Components(embed=embed, heads=heads, mlps=mlps, attn_bias=attn_bias, bias=bias)
    checks = {"sum_of_parts": total, "sum_error": abs(total - logit_diff)}
    if c != 1.0:
        checks["logit_scale"] = c
    if cap is not None:  # the split is of the difference before the cap; the model's own is this
        checks["final_softcap"] = cap
        checks["capped_logit_diff"] = float(last["logits"][target] - last["logits"][other])
    return comps, logit_diff, checks


def _after_head(model, last: dict) -> tuple[float, float | None]:
    """(c, cap): the model's logits are c × the head's (cap None), or cap·tanh(head's / cap) (c = 1)."""
    raw, logits = last["raw"], last["logits"]
    tol = 1e-4 * max(1.0, float(logits.abs().max()))
    c = float((raw @ logits) / (raw @ raw).clamp_min(1e-30))
    c = 1.0 if abs(c - 1.0) < 1e-5 else c
    if float((logits - c * raw).abs().max()) <= tol:
        return c, None
    cap = getattr(model.config, "final_logit_softcapping", None) or getattr(
        getattr(model.config, "text_config", None), "final_logit_softcapping", None
    )
    if cap and float((logits - cap * torch.tanh(raw / cap)).abs().max()) <= tol:
        return 1.0, float(cap)
    raise ExplainError(
        f"{type(model).__name__}'s logits are neither its head's output times a constant nor soft-capped: "
        "an exact breakdown is not available"
    )


def _block_terms(model, last: dict, layer: int, u: torch.Tensor):
    """Block `layer`'s attention and MLP contributions to the residual (d,), and the direction (and the
    constant share) through which its heads reach the logit difference."""
    a, m = last["attn"][layer], last["mlp"][layer]  # the output projection's and the MLP's outputs
    post_a, post_m = _post_norm(last["norms"][layer], a), _post_norm(last["norms"][layer], m)
    u_a, b_a = _frozen_norm(post_a[0], a, u) if post_a else (u, 0.0)
    u_m = _frozen_norm(post_m[0], m, u)[0] if post_m else u  # how a change of the MLP's own output reaches f
    a = post_a[1] if post_a else a
    m = post_m[1] if post_m else m
    alpha, beta = _fit(last["delta"][layer], a, m, type(model).__name__, layer)
    return alpha * a, beta * m, alpha * u_a, alpha * b_a, beta * u_m


def _post_norm(norms: list, x: torch.Tensor):
    """(norm, its output) for the block's own norm that takes `x` as its input (a sandwich norm), or None."""
    for norm, seen_in, seen_out in norms:
        if seen_in.shape == x.shape and torch.allclose(seen_in, x, rtol=1e-5, atol=1e-6):
            return norm, seen_out
    return None


def _fit(delta: torch.Tensor, a: torch.Tensor, m: torch.Tensor, name: str, layer: int) -> tuple[float, float]:
    """α, β with delta = α·a + β·m (the block's own residual increment), or refuse."""
    basis = torch.stack([a, m], dim=1).double()  # (d, 2)
    coef = torch.linalg.lstsq(basis, delta.double()[:, None], driver="gelsd").solution[:, 0]  # SVD: a silent part is 0
    alpha, beta = (1.0 if abs(float(x) - 1.0) < 1e-5 else float(x) for x in coef)
    miss = float((alpha * a + beta * m - delta).abs().max() / delta.abs().max().clamp_min(1e-12))
    if miss > 1e-3:
        raise ExplainError(
            f"{name}: block {layer} adds to the residual stream something other than a multiple of its "
            f"attention and MLP outputs (misses by {miss:.1e} of its size), so an exact breakdown is not available"
        )
    return alpha, beta


def _tensor(output):
    """A module's main output: MoE blocks return (hidden, router scores)."""
    return output[0] if isinstance(output, tuple) else output


def _is_norm(module) -> bool:
    return isinstance(module, torch.nn.LayerNorm) or "Norm" in type(module).__name__


def _capture(model, parts: Parts, input_ids: torch.Tensor) -> dict:
    """Forward with hooks that keep the last position of each projection input/output, MLP output, each
    block's own norms' inputs and outputs, and the final norm's input and output.

    The model is shared: the hooks record only calls from this thread, so another session's generation
    running at the same moment is neither recorded nor changed.
    """
    owner = threading.get_ident()
    got: dict = {"z": {}, "attn": {}, "mlp": {}, "norms": {i: [] for i in range(len(parts.blocks))}}

    def mine() -> bool:
        return threading.get_ident() == owner

    def on_proj(layer):
        def hook(_module, args, output):
            if mine():
                # copies, not views: a float32 tensor's .float() is itself, and some blocks add into
                # their parts' outputs in place afterwards (Falcon: mlp_output += attention_output)
                got["z"][layer] = args[0][0, -1].float().clone()
                got["attn"][layer] = _tensor(output)[0, -1].float().clone()

        return hook

    def on_mlp(layer):
        def hook(_module, _args, output):
            if mine():
                got["mlp"][layer] = _tensor(output)[0, -1].float().clone()  # an MoE block's experts sum inside

        return hook

    def on_block_norm(layer):
        def hook(module, args, output):
            if mine() and args and isinstance(output, torch.Tensor) and output.dim() == 3:
                got["norms"][layer].append((module, args[0][0, -1].float().clone(), output[0, -1].float().clone()))

        return hook

    def on_norm(_module, args, output):
        if mine():
            got["norm_in"], got["norm_out"] = args[0][0, -1].float().clone(), output[0, -1].clone()

    handles = [parts.final_norm.register_forward_hook(on_norm)]
    handles += [p.register_forward_hook(on_proj(i)) for i, p in enumerate(parts.out_proj)]
    handles += [m.register_forward_hook(on_mlp(i)) for i, m in enumerate(parts.mlps)]
    for i, block in enumerate(parts.blocks):
        handles += [n.register_forward_hook(on_block_norm(i)) for n in block.children() if _is_norm(n)]
    try:
        out = model(input_ids=input_ids, use_cache=False, output_hidden_states=True, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    n = len(parts.blocks)
    if len(got["z"]) != n or len(got["mlp"]) != n or "norm_in" not in got:
        raise ExplainError(f"{type(model).__name__}: not every block's projection and MLP ran; cannot break it down")
    hidden = [h[0, -1].float() for h in out.hidden_states[:n]] + [
        got["norm_in"]
    ]  # each block's input, then the last output
    return {
        "logits": out.logits[0, -1].float(),
        "raw": model.get_output_embeddings()(got["norm_out"][None])[0].float(),  # the head alone
        "embed": hidden[0],  # the first block's input: token (+ position) embedding
        "norm_in": got["norm_in"],
        "delta": [hidden[i + 1] - hidden[i] for i in range(n)],  # each block's own residual increment
        "hidden": hidden,  # the residual stream entering each block, then the final norm's input
        "norms": got["norms"],
        "z": [got["z"][i] for i in range(n)],
        "attn": [got["attn"][i] for i in range(n)],
        "mlp": [got["mlp"][i] for i in range(n)],
    }


def logit_diff_fn(model, target: int, other: int):
    """f(embeddings (B, T, d)) -> (B,) logit difference at the last position, for Captum."""

    def f(embeds: torch.Tensor) -> torch.Tensor:
        # the path is float32; a bfloat16 or float16 model takes it in its own dtype (the cast passes gradients)
        embeds = embeds.to(model.get_input_embeddings().weight.dtype)
        logits = model(inputs_embeds=embeds, use_cache=False, logits_to_keep=1).logits[:, -1].float()  # (B, vocab)
        return logits[:, target] - logits[:, other]

    return f


def baseline_embeds(model, input_ids: torch.Tensor) -> torch.Tensor:
    """IG's baseline (1, T, d): zero embeddings everywhere but position 0, which keeps its own (see BASELINE)."""
    with torch.no_grad():
        first = model.get_input_embeddings()(input_ids[:, :1]).float()  # (1, 1, d)
        base = torch.zeros(input_ids.shape + first.shape[-1:], dtype=first.dtype, device=first.device)
        base[:, :1] = first
    return base


@dataclass(eq=False)
class _Piece:
    """One interval [t0, t1] of the path parameter: its IG quadrature and f at its two ends."""

    t0: float
    t1: float
    f0: float
    f1: float
    grads: torch.Tensor  # (1, T, d): the quadrature's weighted gradient sum over this interval
    q: float  # grads · (x - base): what the interval adds to the scores' sum; it must be f1 - f0

    @property
    def error(self) -> float:
        return abs(self.q - (self.f1 - self.f0))


def integrated_gradients(
    f, x: torch.Tensor, base: torch.Tensor, n_steps: int = IG_STEPS, tolerance: float = IG_TOLERANCE, check=None
) -> tuple[torch.Tensor, float, int]:
    """(1, T, d) attributions along the straight path from `base` to `x`, the relative completeness
    error |Σ scores − (f(x) − f(base))| / |f(x) − f(base)|, and the gradient evaluations spent.

    Adaptive: the path parameter t (alpha = t**IG_WARP) starts in IG_PIECES intervals with two
    Gauss-Legendre nodes each; every interval's quadrature is checked against the exact change of f
    over it (forward passes at its ends), and the worst intervals are halved until their errors add
    up to at most `tolerance` of the whole change, or `n_steps` gradient evaluations are spent. A
    fixed grid does not do on real models: f along the path is rough (the default model's swings by
    ±2 logits within alpha < 0.05), and 16–64 fixed nodes missed completeness by 16–330 %.
    `check()` runs before every batched pass (it raises to stop: see _Passes).
    """
    check = check or _Passes()
    first = max(1, min(IG_PIECES, n_steps // 2))
    edges = torch.linspace(0, 1, first + 1)
    fs = _f_at(f, x, base, edges, check).tolist()
    spans = [(float(a), float(b), fa, fb) for a, b, fa, fb in zip(edges, edges[1:], fs, fs[1:])]
    pieces = _pieces(f, x, base, spans, check)
    gap, spent = fs[-1] - fs[0], 2 * first
    while spent + 4 <= n_steps and sum(p.error for p in pieces) > tolerance * max(abs(gap), 1e-6):
        room = (n_steps - spent) // 4
        worst = sorted(pieces, key=lambda p: p.error, reverse=True)[: min(room, IG_SPLITS_PER_ROUND)]
        mids = [(p.t0 + p.t1) / 2 for p in worst]
        fm = _f_at(f, x, base, torch.tensor(mids), check).tolist()
        halves = [(p.t0, m, p.f0, v) for p, m, v in zip(worst, mids, fm)]
        halves += [(m, p.t1, v, p.f1) for p, m, v in zip(worst, mids, fm)]
        pieces = [p for p in pieces if all(p is not w for w in worst)] + _pieces(f, x, base, halves, check)
        spent += 4 * len(worst)
    attr = sum(p.grads for p in pieces) * (x - base)
    return attr, abs(float(attr.sum()) - gap) / max(abs(gap), 1e-6), spent


def _points(x: torch.Tensor, base: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(n, T, d) points of the path at parameters t (n,)."""
    alpha = (t.to(x.device, x.dtype) ** IG_WARP).view(-1, 1, 1)
    return base + alpha * (x - base)


def _f_at(f, x: torch.Tensor, base: torch.Tensor, t: torch.Tensor, check) -> torch.Tensor:
    """f at path parameters t, forward only, batched within IG_TOKENS_PER_BATCH."""
    batch = max(1, IG_TOKENS_PER_BATCH // x.shape[1])
    out = []
    for i in range(0, len(t), batch):
        check()
        with torch.no_grad():
            out.append(f(_points(x, base, t[i : i + batch])).float().cpu())
    return torch.cat(out)


def _pieces(
    f, x: torch.Tensor, base: torch.Tensor, spans: list[tuple[float, float, float, float]], check
) -> list[_Piece]:
    """Quadrature of each span (t0, t1, f0, f1): two Gauss-Legendre nodes, gradients batched."""
    nodes, weights = [], []
    for t0, t1, _, _ in spans:
        half, mid = (t1 - t0) / 2, (t1 + t0) / 2
        for u in (-(3**-0.5), 3**-0.5):  # 2-point Gauss-Legendre, weights 1
            t = mid + half * u
            nodes.append(t)
            weights.append(half * IG_WARP * t ** (IG_WARP - 1))  # dalpha = IG_WARP t^(IG_WARP-1) dt
    grads = _grads(f, x, base, torch.tensor(nodes), check) * torch.tensor(weights).view(-1, 1, 1).to(x.device)
    d = x - base
    out = []
    for i, (t0, t1, f0, f1) in enumerate(spans):
        g = grads[2 * i : 2 * i + 2].sum(0, keepdim=True)  # (1, T, d)
        out.append(_Piece(t0, t1, f0, f1, g, float((g * d).sum())))
    return out


def _grads(f, x: torch.Tensor, base: torch.Tensor, t: torch.Tensor, check) -> torch.Tensor:
    """(n, T, d) gradients of f at path parameters t, batched within IG_TOKENS_PER_BATCH."""
    batch = max(1, IG_TOKENS_PER_BATCH // x.shape[1])
    out = []
    for i in range(0, len(t), batch):
        check()
        points = _points(x, base, t[i : i + batch]).requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(f(points).sum(), points)
        out.append(grad)
    return torch.cat(out)


def attribute(
    model, input_ids: torch.Tensor, target: int, other: int, method: str, ig_steps: int = IG_STEPS, check=None
) -> tuple[list[float], float | None, int]:
    """One score per position (summed over the embedding), IG's relative completeness error and the
    gradient evaluations it spent (None and 1 for gradient x input). `check()` runs before each pass."""
    check = check or _Passes()
    f = logit_diff_fn(model, target, other)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(input_ids).float()  # (1, T, d)
    with recomputed_blocks(find_parts(model).blocks):
        return _attribute(model, f, embeds, input_ids, target, other, method, ig_steps, check)


def _attribute(model, f, embeds, input_ids, target, other, method, ig_steps, check):
    if method != "integrated_gradients":
        check()  # one backward; integrated gradients checks before each of its own passes
    if method == "attn_lrp":
        from . import capture, lrp

        capture.install(model)  # AttnLRP's attention rule lives in the capture function
        with lrp.rules(model), torch.enable_grad():
            x = embeds.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(f(x).sum(), x)
        return (grad * embeds)[0].sum(-1).tolist(), None, 1
    if method == "grad_x_input":
        from captum.attr import InputXGradient

        with torch.enable_grad():
            attr = InputXGradient(f).attribute(embeds.clone().requires_grad_(True))  # (1, T, d)
        return attr[0].sum(-1).tolist(), None, 1
    attr, error, spent = integrated_gradients(f, embeds, baseline_embeds(model, input_ids), ig_steps, check=check)
    return attr[0].sum(-1).tolist(), error, spent


@contextmanager
def recomputed_blocks(blocks: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Backward passes through `blocks` recompute each block's activations instead of keeping them.

    Kept, they cost about 0.9 MB per position and batch row on the default model (30 blocks): explaining
    a step of a 1,012-token prompt took the hosted app from 1.3 GB to 3.8 GB, past a 2.7 GB host. With
    torch.utils.checkpoint only each block's input stays (and one block's activations during its
    backward), for one more forward per backward: at 1,012 positions, two rows per backward, +586 MB
    instead of +1,837 MB and 1.4 times the time. Gradients are the same numbers: the recomputation
    runs the same kernels on the same inputs. The model is shared by every session: only calls from
    this thread with gradients on are checkpointed, and each block's own forward comes back afterwards
    (accelerate's hooks, kept on the instance, included).
    """
    from torch.utils.checkpoint import checkpoint

    owner = threading.get_ident()
    saved = [block.__dict__.get("forward") for block in blocks]
    for block in blocks:
        original = block.forward

        def forward(*args, _original=original, **kwargs):
            if threading.get_ident() != owner or not torch.is_grad_enabled():
                return _original(*args, **kwargs)
            # the recomputation may run on autograd's thread: it carries this forward's LRP rules there
            return checkpoint(_original, *args, use_reentrant=False, context_fn=lrp.recompute_contexts, **kwargs)

        block.forward = forward
    try:
        yield
    finally:
        for block, before in zip(blocks, saved):
            if before is None:
                del block.forward  # the class's forward again
            else:
                block.forward = before


def top_components(comps: Components, n: int = 10) -> list[tuple[str, float]]:
    """The n parts with the largest absolute share, as (name, value), largest first."""
    named = [("embedding", comps.embed), ("biases", comps.bias + sum(comps.attn_bias))]
    named += [(f"L{layer} H{head}", v) for layer, row in enumerate(comps.heads) for head, v in enumerate(row)]
    named += [(f"L{layer} MLP", v) for layer, v in enumerate(comps.mlps)]
    return sorted(named, key=lambda kv: abs(kv[1]), reverse=True)[:n]


def trace_and_model(path: str, branch: int, model: str | None, limits):
    """A saved trace (through admission), checked to hold `branch`, and the model to re-run it with (the
    trace's own unless `model` names another), under the app's caps: this re-runs the prompt and the steps
    up to the one asked about. For the CLI's explain and intervene."""
    from . import models, tracefile

    trace, _ = tracefile.load(path)
    if not 0 <= branch <= 1000 or (branch and trace.branch(branch) is None):
        raise ExplainError(f"the trace has no branch {branch}")
    limits.check_replay(trace)
    return trace, models.load(model or trace.model.name, limits=limits)


def cli_main(argv: list[str]) -> int:
    """`python -m explorer_core explain TRACE.json --step N ...`: exit 0 on success, 2 when it cannot run."""
    import argparse
    import json
    import sys
    from pathlib import Path

    from . import models
    from . import trace as trace_io
    from .limits import Limits

    p = argparse.ArgumentParser(
        prog="python -m explorer_core explain",
        description="Explain why a step of a saved trace chose its token over a contrast token: input "
        "attribution (gradient x input, attention-aware LRP, integrated gradients) and the logit difference split into the "
        "embedding, every attention head and every MLP. Recomputed with the model named in the trace.",
    )
    p.add_argument("trace", help="Path to trace.json.")
    p.add_argument("--step", type=int, required=True, help="Step to explain (0 = first generated token).")
    p.add_argument(
        "--contrast",
        default=None,
        help="Contrast token: an id, or one token's text exactly as the model writes it, leading space "
        "included (quote it: ' Paris'); default: the runner-up.",
    )
    p.add_argument("--branch", type=int, default=0, help="Path to explain: 0 = main run, else a branch id.")
    p.add_argument(
        "--ig_steps",
        type=int,
        default=IG_STEPS,
        help=f"Integrated gradients' most gradient passes (default {IG_STEPS}); it stops sooner once its scores add up.",
    )
    p.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"Attribution methods, comma-separated, from {', '.join(METHODS)} (default: all; "
        "integrated_gradients is the slow one).",
    )
    p.add_argument("--model", default=None, help="Model to use (default: the one named in the trace).")
    p.add_argument("--out", default=None, help="Write the JSON here (default: print it).")
    args = p.parse_args(argv)
    try:
        if not 1 <= args.ig_steps <= 1024:
            raise ExplainError(f"--ig_steps {args.ig_steps} is out of range: use 1..1024")
        limits = Limits.from_env()
        limits.check_explain(args.ig_steps)
        trace, lm = trace_and_model(args.trace, args.branch, args.model, limits)
        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        result = explain(lm, trace, args.step, args.contrast, args.branch, methods, args.ig_steps)
    except (trace_io.TraceError, models.ModelLoadError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(result.model_dump(), indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    else:
        print(text)
    print(summary(result), file=sys.stderr)
    return 0


def summary(e: Explanation) -> str:
    """A few lines for people: the difference, its check, each method's top positions, the top components."""
    lines = [
        f"step {e.step}: {e.target.label!r} over {e.contrast.label!r}, logit difference {e.logit_diff:.4f} "
        f"(parts sum to {e.checks['sum_of_parts']:.4f})"
    ]
    for method, scores in e.inputs.methods.items():
        order = sorted(range(len(scores)), key=lambda i: abs(scores[i]), reverse=True)[:5]
        err = e.checks.get(f"{method}_completeness_error")
        extra = f" (completeness error {err:.1%})" if err is not None else ""
        tops = ", ".join(f"{i}:{e.inputs.labels[i]!r} {scores[i]:+.3f}" for i in order)
        lines.append(f"{METHOD_NAMES[method]}{extra}: {tops}")
    lines.append("top components: " + ", ".join(f"{n} {v:+.3f}" for n, v in top_components(e.components, 5)))
    return "\n".join(lines)

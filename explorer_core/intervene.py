"""What if? Change one part of the model at a step of a trace and measure what the step's choice does.

For step N the measured quantity is explain's: f = logit[target] - logit[contrast] at the last position
of prompt + tokens 0..N-1 (target: the token chosen there; contrast: the best other candidate, or one
the caller names). Every change is made by forward hooks on the model's own modules; the model's own
code computes everything else, so nothing of its math is re-implemented here.

Parts (`Target`, written as the CLI takes them):
- "L.H": head H of layer L, its slice of the attention output projection's input;
- "L.mlp": the MLP of layer L, its output;
- "resid:L@P": the residual stream entering block L at position P ("embed@P" is resid:0@P, the token's
  embedding as the first block reads it; L = n_layers is the final norm's input).
Operations (`Op`): zero; mean (the part's mean over the sequence's positions); scale:F; patch (the same
part's values in another sequence of the same length); steer (add strength x v, v the difference of the
mean residual of two texts at that layer). Scope: "step" changes the part at the step's position only
(one forward of the last token, the prefix cache reused and batched); "all" at every position (the
sequence re-run without cache).

Beside each measured change stands the breakdown's prediction (explain.breakdown's linearisation): the
part's change at the last position times its direction, i.e. its direct effect with every later layer
and the final norm's scale held. The gap is split in two measured parts: a second forward holds the final
norm's scale at its clean value, so measured - frozen is the norm's rescaling and frozen - predicted is
the indirect effect through later layers.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from .explain import (
    Cancel,
    ExplainError,
    Parts,
    _Passes,
    breakdown,
    find_parts,
    norm_form,
    resolve_contrast,
    trace_and_model,
)
from .explain import sequence_for as _sequence_for
from .lens import inner_model
from .models import LoadedModel
from .tokens import vocab_for
from .trace import Candidates, InterventionRecord, Outcome, Prediction, SweepRecord, TokenRef, Trace

OPS = ("zero", "mean", "scale", "patch", "steer")
SCOPES = ("step", "all")
TOP_K = 10
BATCH = int(os.environ.get("EXPLORER_INTERVENE_BATCH", "16"))  # rows per batched forward: bounds memory
# what one batched forward may add in memory: rows are cut to fit (a 16-row batch at 800 tokens held 590 MB
# of concatenated keys and values on the default model); nothing is allocated past it however long the prompt
BATCH_MB = int(os.environ.get("EXPLORER_INTERVENE_MB", "256"))
DRIFT_OK = 1e-3  # a kept result made again within this many logits is reproduced (cached vs uncached: ~1e-5)


# what the breakdown raises on a layout it cannot read (explain() words the same set)
BREAKDOWN_FAILURES = (ExplainError, RuntimeError, TypeError, IndexError, AttributeError, ValueError)


class InterventionError(ExplainError):
    """An intervention cannot be made; the message names the bad value and what to do."""


@dataclass(frozen=True)
class Target:
    kind: str  # "head", "mlp" or "resid"
    layer: int
    head: int | None = None
    position: int | None = None  # resid only; None: the scope's positions

    @classmethod
    def parse(cls, text: str) -> Target:
        t = text.strip()
        if m := re.fullmatch(r"(\d+)\.(\d+)", t):
            return cls("head", int(m[1]), int(m[2]))
        if m := re.fullmatch(r"(\d+)\.mlp", t):
            return cls("mlp", int(m[1]))
        if m := re.fullmatch(r"embed@(\d+)", t):
            return cls("resid", 0, position=int(m[1]))
        if m := re.fullmatch(r"resid:(\d+)(?:@(\d+))?", t):
            return cls("resid", int(m[1]), position=None if m[2] is None else int(m[2]))
        raise InterventionError(
            f"target {text!r} is not a part: write L.H for a head (e.g. 29.3), L.mlp for an MLP (29.mlp), "
            "embed@P for a token's embedding or resid:L@P for the residual stream entering block L"
        )

    def __str__(self) -> str:
        if self.kind == "head":
            return f"{self.layer}.{self.head}"
        if self.kind == "mlp":
            return f"{self.layer}.mlp"
        where = "" if self.position is None else f"@{self.position}"
        return f"embed{where}" if self.layer == 0 and where else f"resid:{self.layer}{where}"


@dataclass(frozen=True)
class Op:
    kind: str = "zero"
    factor: float = 0.0  # scale: the factor; steer: the strength
    source: tuple[int, ...] | None = None  # patch: the source sequence's token ids
    texts: tuple[str, str] | None = None  # steer: (towards, away from)

    @classmethod
    def parse(cls, text: str) -> Op:
        t = text.strip()
        if t in ("zero", "mean"):
            return cls(t)
        if m := re.fullmatch(r"(scale|steer):([-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)", t):
            return cls(m[1], float(m[2]))
        if t == "patch":
            return cls("patch")
        raise InterventionError(
            f"operation {text!r} is not one of: zero, mean, scale:F (e.g. scale:0.5), patch, steer:F (e.g. steer:4)"
        )

    def __str__(self) -> str:
        return f"{self.kind}:{self.factor:g}" if self.kind in ("scale", "steer") else self.kind


@dataclass(frozen=True)
class Intervention:
    target: Target
    op: Op = field(default_factory=Op)
    scope: str = "step"

    def __str__(self) -> str:
        return f"{self.op} {self.target} ({'this position' if self.scope == 'step' else 'every position'})"


@dataclass
class Effect:
    """One intervention's measured effect on f at the step, beside the breakdown's prediction."""

    intervention: Intervention | tuple[Intervention, ...]  # a tuple: several made at once
    logit_diff: float  # f after the intervention (the model's own logits)
    delta: float  # after - before
    frozen_delta: float | None  # the same with the final norm's scale held at its clean value
    predicted: float | None  # the breakdown's direct effect: the part's change times its direction
    top: list[tuple[int, str, float]]  # the top-k after, (id, label, probability)

    @property
    def indirect(self) -> float | None:
        """What later layers add or take away beyond the direct path (final norm held)."""
        return None if self.frozen_delta is None or self.predicted is None else self.frozen_delta - self.predicted

    @property
    def rescaling(self) -> float | None:
        """What the final norm's change of scale adds: measured - frozen."""
        return None if self.frozen_delta is None else self.delta - self.frozen_delta


@dataclass
class _Prepared:
    """An intervention bound to a module and a function of (values, absolute positions)."""

    module: torch.nn.Module
    pre: bool  # a pre-hook on the module's input (a head's slice, the residual entering a block)
    cols: slice
    positions: set[int] | None  # None: every position
    fn: Callable[[torch.Tensor, list[int]], torch.Tensor]


class Probe:
    """Step `step` of a trace, made ready for interventions: the prefix's cache, each part's mean over
    the sequence and value at the last position, and the breakdown's directions (when it reads the model).

    Building it costs one prefill of the prefix, one forward of the last token, the breakdown's one
    uncached forward and a two-row check that the cache batches; each `run` after that costs one forward
    of the last token per batch of rows (scope "step"), or one uncached forward of the sequence per batch
    (scope "all"). Rows per batch: at most BATCH, and as many as fit in BATCH_MB.
    """

    def __init__(self, lm: LoadedModel, trace: Trace, step: int, contrast=None, branch: int = 0, cancel: Cancel = None):
        self.lm, self.model, self.passes = lm, lm.model, _Passes(cancel)
        self.parts: Parts = find_parts(lm.model)  # refuses a layout without heads and MLPs, with the reason
        self.inner = inner_model(lm.model)
        if self.inner is None:
            raise InterventionError(f"{type(lm.model).__name__} has no inner model under its head to intervene on")
        ids, record = _sequence_for(lm, trace, step, branch)
        self.trace, self.branch = trace, branch
        self.step, self.ids, self.T = step, ids, len(ids)
        self.target, self.contrast = record.token_id, resolve_contrast(lm, record, contrast)
        self.vocab = vocab_for(lm.tokenizer)
        self.input_ids = torch.tensor([ids], device=lm.device)
        self.directions: dict = {}
        self.prediction_error: str | None = None
        try:
            self.components, _, self.checks = breakdown(
                self.model, self.parts, self.input_ids, self.target, self.contrast, self.directions
            )
        except BREAKDOWN_FAILURES as exc:  # interventions still work; predictions are not available
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self.components, self.checks = None, {}
            self.prediction_error = f"the breakdown cannot read this model: {why}"
        self._offset = 0
        self.odd: dict[tuple[str, int], tuple] = {}  # sites whose tensor is not (batch, position, width)
        self._prepare()

    # -- preparation ----------------------------------------------------------------------------
    def sites(self) -> dict[str, list[torch.nn.Module]]:
        p = self.parts
        return {"z": p.out_proj, "mlp": p.mlps, "resid": [*p.blocks, p.final_norm]}

    @torch.inference_mode()
    def _prepare(self) -> None:
        """Prefix cache, the parts' sums over positions (for means) and their values at the last one."""
        sums, last = {}, {}
        with self._offsets(), self._recording(sums, last):
            self.passes()
            out = self.model(input_ids=self.input_ids[:, :-1], use_cache=True, logits_to_keep=1)
            self.cache = getattr(out, "cache", None)
            if self.cache is not None and self.cache.get_seq_length() != self.T - 1:
                self.cache = None  # a model that returns no usable cache: every run re-runs the sequence
            self.passes()
            if self.cache is not None:
                clean = self.model(input_ids=self.input_ids[:, -1:], cache=copy.deepcopy(self.cache))
            else:
                sums.clear()  # the uncached run below sees every position again
                clean = self.model(input_ids=self.input_ids, use_cache=False, logits_to_keep=1)
        self.means = {k: [s / self.T for s in v] for k, v in sums.items()}
        self.last = last
        self.before_logits = clean.logits[0, -1].float()
        self.before = self._diff(self.before_logits)
        self.norm = norm_form(self.parts.final_norm, last["resid"][-1])
        self.rows_per_cache = BATCH if self.cache is not None and self._cache_batches() else 1
        self.rows_per_cache = min(self.rows_per_cache, _rows_within(BATCH_MB, self._cache_row_bytes()))
        self.rows_uncached = min(BATCH, _rows_within(BATCH_MB, self._uncached_row_bytes()))

    def _cache_row_bytes(self) -> int:
        """Bytes one row's keys and values take once the step's position joins them (every layer)."""
        layers = getattr(self.cache, "layers", None) or []
        tensors = [t for layer in layers for t in (getattr(layer, "keys", None), getattr(layer, "values", None))]
        per_row = sum(t[:1].numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
        return int(per_row * (self.T / max(1, self.T - 1)))

    def _uncached_row_bytes(self) -> int:
        """One row of an uncached forward: a layer's attention scores (T x T per head, float32, as an eager
        implementation holds them) and a few hidden-state copies of the sequence."""
        cfg = self.model.config
        heads = int(getattr(cfg, "num_attention_heads", 1) or 1)
        width = int(getattr(cfg, "hidden_size", 0) or 0)
        return 4 * (heads * self.T * self.T + 8 * self.T * width)

    def _cache_batches(self) -> bool:
        """Whether the prefix cache, repeated for a batch, gives each row the clean logits: a cache whose
        layers keep state the repeat misses (Falcon-H1's convolution state) runs its rows one at a time."""
        self.rows_per_cache = 2
        try:
            logits, _ = self._rows([([], False), ([], False)], full=False)
        except (RuntimeError, ValueError, IndexError, TypeError):
            return False
        tol = 1e-4 * max(1.0, float(self.before_logits.abs().max()))
        return bool((logits - self.before_logits).abs().max() <= tol)

    def _recording(self, sums: dict, last: dict):
        """Hooks adding each part's values over positions into `sums` and keeping the last one in `last`."""
        owner = threading.get_ident()

        def keep(kind: str, i: int, x: torch.Tensor) -> None:
            if threading.get_ident() != owner:
                return
            if x.dim() != 3:  # not (batch, position, width): Gemma 3n's AltUp streams, say
                self.odd[(kind, i)] = tuple(x.shape)
                return
            x = x[0].float()
            sums.setdefault(kind, [0] * len(self.sites()[kind]))
            sums[kind][i] = sums[kind][i] + x.sum(0)
            # a copy: some blocks add into a part's output in place after the hook (Falcon's MLP)
            last.setdefault(kind, [None] * len(self.sites()[kind]))[i] = x[-1].clone()

        handles = []
        for kind, modules in self.sites().items():
            for i, module in enumerate(modules):
                if kind == "mlp":
                    handles.append(module.register_forward_hook(lambda _m, a, o, i=i: keep("mlp", i, _main3(o, a))))
                else:
                    handles.append(
                        module.register_forward_pre_hook(
                            lambda _m, a, kw, i=i, k=kind: keep(k, i, _first_input(a, kw)), with_kwargs=True
                        )
                    )
        return _Handles(handles)

    def _offsets(self):
        """A pre-hook on the inner model: the absolute position of each forward's first token."""

        def hook(_module, _args, kwargs):
            past = kwargs.get("cache", kwargs.get("past_key_values"))  # 5.24's name, then the older one
            self._offset = int(past.get_seq_length()) if past is not None else 0

        return _Handles([self.inner.register_forward_pre_hook(hook, with_kwargs=True)])

    # -- interventions ----------------------------------------------------------------------------
    def bind(self, iv: Intervention) -> _Prepared:
        """The module, columns, positions and function an intervention acts through, or the reason not."""
        t, op, p = iv.target, iv.op, self.parts
        n = len(p.blocks)
        if iv.scope not in SCOPES:
            raise InterventionError(f"scope {iv.scope!r} is not one of: step, all")
        if op.kind not in OPS:
            raise InterventionError(f"operation {op.kind!r} is not one of: {', '.join(OPS)}")
        top = n if t.kind == "resid" else n - 1
        if not 0 <= t.layer <= top:
            raise InterventionError(f"layer {t.layer} is out of range: this model's layers are 0..{top}")
        if t.kind == "head":
            width = p.out_proj[t.layer].weight.shape[0 if p.transposed else 1] // p.n_heads
            if not 0 <= (t.head or 0) < p.n_heads or t.head is None:
                raise InterventionError(f"head {t.head} is out of range: layer {t.layer} has heads 0..{p.n_heads - 1}")
            module, pre, cols, kind = p.out_proj[t.layer], True, slice(t.head * width, (t.head + 1) * width), "z"
        elif t.kind == "mlp":
            module, pre, cols, kind = p.mlps[t.layer], False, slice(None), "mlp"
        else:
            module, pre, cols, kind = self.sites()["resid"][t.layer], True, slice(None), "resid"
        shape = self.odd.get((kind, t.layer))
        if shape is not None:
            raise InterventionError(
                f"{t}: this model's tensor there has shape {shape}, not (batch, position, width), so it cannot be "
                "changed position by position (Gemma 3n keeps several residual streams): pick a head or an MLP"
            )
        if op.kind == "steer" and t.kind != "resid":
            raise InterventionError("steering adds to the residual stream: give a resid:L target")
        if t.position is not None and not 0 <= t.position < self.T:
            raise InterventionError(f"position {t.position} is out of range: the sequence has 0..{self.T - 1}")
        if t.position is not None:
            positions = {t.position}
        else:
            positions = {self.T - 1} if iv.scope == "step" else None
        return _Prepared(module, pre, cols, positions, self._function(iv, kind, cols))

    def _function(self, iv: Intervention, kind: str, cols: slice) -> Callable:
        op, layer = iv.op, iv.target.layer
        if op.kind == "zero":
            return lambda x, _pos: torch.zeros_like(x)
        if op.kind == "scale":
            return lambda x, _pos: x * op.factor
        if op.kind == "mean":
            mean = self.means[kind][layer][cols]
            return lambda x, _pos: mean.to(x.dtype).expand_as(x)
        if op.kind == "patch":
            source = self._source_values(op, kind, layer)[:, cols]
            return lambda x, pos: source[[min(q, len(source) - 1) for q in pos]].to(x.dtype)
        vector = op.factor * steering_vector(self, layer, *op.texts) if op.texts else None
        if vector is None:
            raise InterventionError("steering needs two texts: the direction is mean(text 1) - mean(text 2)")
        return lambda x, _pos: x + vector.to(x.dtype)

    @torch.inference_mode()
    def _source_values(self, op: Op, kind: str, layer: int) -> torch.Tensor:
        """The part's values at every position of the patch's source sequence (T, width)."""
        src = list(op.source or ())
        if len(src) != self.T:
            raise InterventionError(
                f"the patch's source has {len(src)} tokens and this step's sequence {self.T}: patch from a "
                "sequence of the same length (a branch of the same step, or a prompt of as many tokens)"
            )
        return values_at(self, kind, layer, src)

    def predicted(self, iv: Intervention, bound: _Prepared) -> float | None:
        """The breakdown's direct effect: the part's change at the last position times its direction."""
        if not self.directions or (bound.positions is not None and self.T - 1 not in bound.positions):
            return None if not self.directions else 0.0  # no direct path from another position
        kind = {"head": "z", "mlp": "mlp", "resid": "resid"}[iv.target.kind]
        layer = iv.target.layer
        clean = self.last[kind][layer][bound.cols]
        delta = bound.fn(clean[None], [self.T - 1])[0] - clean
        direction = {
            "z": lambda: self.directions["heads"][layer][bound.cols],
            "mlp": lambda: self.directions["mlps"][layer],
            "resid": lambda: self.directions["resid"],
        }[kind]()
        return float(delta.float() @ direction)

    def run(self, interventions: Sequence[Intervention], frozen: bool = True) -> list[Effect]:
        """Each intervention's effect (rows batched; each also with the final norm held when `frozen`)."""
        return [self._effect(ivs, logits) for ivs, logits in self._measure([[iv] for iv in interventions], frozen)]

    def run_together(self, interventions: Sequence[Intervention], frozen: bool = True) -> Effect:
        """The effect of all `interventions` made at once, in one forward."""
        ((ivs, logits),) = self._measure([list(interventions)], frozen)
        return self._effect(ivs, logits)

    def _measure(self, groups: list[list[Intervention]], frozen: bool):
        bound = [[self.bind(iv) for iv in ivs] for ivs in groups]
        full = any(
            iv.scope == "all" or (b.positions or {0}) != {self.T - 1}
            for ivs, bs in zip(groups, bound, strict=True)
            for iv, b in zip(ivs, bs, strict=True)
        )
        logits, held = self._rows([(b, False) for b in bound], full, frozen)
        for i, (ivs, bs) in enumerate(zip(groups, bound, strict=True)):
            yield list(zip(ivs, bs, strict=True)), (logits[i], held[i] if held is not None else None)

    def _effect(self, pairs: list[tuple[Intervention, _Prepared]], logits) -> Effect:
        after_logits, frozen_logits = logits
        after = self._diff(after_logits)
        frozen_delta = None if frozen_logits is None else self._diff(frozen_logits) - self.before
        parts = [self.predicted(iv, b) for iv, b in pairs]
        predicted = None if any(p is None for p in parts) else sum(parts)  # direct effects add: f is linear
        ivs = tuple(iv for iv, _b in pairs)
        return Effect(
            ivs[0] if len(ivs) == 1 else ivs,
            after,
            after - self.before,
            frozen_delta,
            predicted,
            self.top(after_logits),
        )

    @torch.inference_mode()
    def _rows(self, rows: list[tuple[list[_Prepared], bool]], full: bool, frozen: bool = False):
        """(len(rows), vocab) logits at the last position, each row with its own interventions; with `frozen`,
        also each row's logits with the final norm's scale held at its clean value (else None)."""
        out, held = [], []
        step = self.rows_uncached if full or self.cache is None else self.rows_per_cache
        for start in range(0, len(rows), step):
            self.passes()
            chunk = rows[start : start + step]
            seen: dict = {}
            with self._offsets(), self._applied(chunk), self._norm_input(seen if frozen else None):
                if full or self.cache is None:
                    x = self.input_ids.expand(len(chunk), -1)
                    logits = self.model(input_ids=x, use_cache=False, logits_to_keep=1).logits
                else:
                    cache = _repeated(self.cache, len(chunk))
                    x = self.input_ids[:, -1:].expand(len(chunk), -1)
                    logits = self.model(input_ids=x, cache=cache, use_cache=True).logits
            out.append(logits[:, -1].float())
            if frozen:
                held.append(self._held_norm_logits(seen["x"]))
        return torch.cat(out), (torch.cat(held) if frozen else None)

    def _norm_input(self, seen: dict | None):
        """A hook keeping the final norm's input at the last position (rows, d) into `seen`, when asked."""
        if seen is None:
            return _Handles([])
        owner = threading.get_ident()

        def hook(_module, args):
            if threading.get_ident() == owner:
                seen["x"] = args[0][:, -1].float()

        return _Handles([self.parts.final_norm.register_forward_pre_hook(hook)])

    def _held_norm_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The model's own head on the final norm's form with the clean run's 1/rms: the logits each row
        would give if the final norm had not rescaled (no second forward needed: the norm acts per position)."""
        from .lens import head_logits

        centred, scale, bias, inv = self.norm
        h = x - x.mean(-1, keepdim=True) if centred else x
        normed = (scale * h * inv + bias).to(_param_dtype(self.parts.final_norm, x.dtype))
        return head_logits(self.model, normed)

    def _applied(self, rows: list[tuple[list[_Prepared], bool]]):
        """Hooks making row r's interventions in one batched forward."""
        owner = threading.get_ident()
        by_module: dict[torch.nn.Module, list[tuple[int, _Prepared]]] = {}
        for r, (bs, _frozen) in enumerate(rows):
            for b in bs:
                by_module.setdefault(b.module, []).append((r, b))
        return _Handles([_hook(module, items, owner, self) for module, items in by_module.items()])

    # -- reading results --------------------------------------------------------------------------
    def _diff(self, logits: torch.Tensor) -> float:
        return float(logits[self.target] - logits[self.contrast])

    def top(self, logits: torch.Tensor, k: int = TOP_K) -> list[tuple[int, str, float]]:
        p = torch.softmax(logits.float(), -1)
        values, ids = torch.topk(p, k)
        return [(int(i), self.vocab.label(int(i)), float(v)) for v, i in zip(values, ids, strict=True)]

    def sweep(self, layers: Iterable[int] | None = None, mlps: bool = True, op: Op | None = None) -> list[Effect]:
        """Every head of `layers` (all by default), and their MLPs, changed one at a time at this position."""
        op = op or Op("zero")
        layers = list(range(len(self.parts.blocks)) if layers is None else layers)
        ivs = [Intervention(Target("head", L, h), op) for L in layers for h in range(self.parts.n_heads)]
        ivs += [Intervention(Target("mlp", L), op) for L in layers] if mlps else []
        return self.run(ivs, frozen=False)


def correlation(effects: Sequence[Effect]) -> float | None:
    """Pearson correlation of measured and predicted changes (None when either is constant or missing)."""
    pairs = [(e.delta, e.predicted) for e in effects if e.predicted is not None]
    if len(pairs) < 2:
        return None
    m, p = torch.tensor(pairs, dtype=torch.float64).T
    if float(m.std()) == 0 or float(p.std()) == 0:
        return None
    return float(torch.corrcoef(torch.stack([m, p]))[0, 1])


@torch.inference_mode()
def values_at(probe: Probe, kind: str, layer: int, ids: list[int]) -> torch.Tensor:
    """A part's values at every position of a sequence (T, width), read by one uncached forward."""
    got = {}
    module = probe.sites()[kind][layer]
    owner = threading.get_ident()

    def grab(x: torch.Tensor) -> None:
        if threading.get_ident() == owner:
            got["x"] = x[0].float().clone()  # a copy: the block may add into it in place afterwards

    if kind == "mlp":
        handle = module.register_forward_hook(lambda _m, a, o: grab(_main3(o, a)))
    else:
        handle = module.register_forward_pre_hook(lambda _m, a, kw: grab(_first_input(a, kw)), with_kwargs=True)
    try:
        probe.passes()
        probe.model(input_ids=torch.tensor([ids], device=probe.lm.device), use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    return got["x"]


def steering_vector(probe: Probe, layer: int, towards: str, away: str) -> torch.Tensor:
    """mean(residual entering block `layer` over text 1's positions) - the same for text 2."""
    means = []
    for text in (towards, away):
        ids = probe.lm.tokenizer(text)["input_ids"]
        if not ids:
            raise InterventionError(f"steering text {text!r} has no tokens: give a word or a sentence")
        means.append(values_at(probe, "resid", layer, list(ids)).mean(0))
    return means[0] - means[1]


def _hook(module, items: list[tuple[int, _Prepared]], owner: int, probe: Probe):
    """One hook on `module` making each row's change at its positions of this forward."""

    def apply(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        offset, width = probe._offset, x.shape[1]
        for row, b in items:
            pos = range(offset, offset + width) if b.positions is None else sorted(b.positions)
            pos = [q for q in pos if offset <= q < offset + width]
            if not pos:
                continue
            local = [q - offset for q in pos]
            x[row, local, b.cols] = b.fn(x[row, local, b.cols], pos).to(x.dtype)
        return x

    if items[0][1].pre:

        def pre(_m, args, kwargs):
            if threading.get_ident() != owner:
                return None
            if args:
                return (apply(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": apply(kwargs["hidden_states"])}

        return module.register_forward_pre_hook(pre, with_kwargs=True)

    def post(_m, args, output):
        if threading.get_ident() != owner:
            return output
        main = _main(output)
        changed = apply(_main3(main, args)).view(main.shape)  # an MoE may return (batch·positions, width)
        return (changed, *output[1:]) if isinstance(output, tuple) else changed

    return module.register_forward_hook(post)


def _rows_within(mb: int, row_bytes: int) -> int:
    """Rows of `row_bytes` each that fit in `mb` MiB (at least one: a single row is the least work there is)."""
    return max(1, int(mb * 2**20 // max(1, row_bytes)))


def _param_dtype(module, default: torch.dtype) -> torch.dtype:
    return next((p.dtype for p in module.parameters()), default)


def _main(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _main3(output, args) -> torch.Tensor:
    """A module's main output as (batch, position, width): Llama 4's MoE returns it flattened."""
    out = _main(output)
    given = args[0] if args else None
    if out.dim() == 2 and isinstance(given, torch.Tensor) and given.dim() == 3:
        return out.view(*given.shape[:-1], out.shape[-1])
    return out


_CONCAT_LAYERS = ("DynamicLayer", "DynamicSlidingWindowLayer")  # update() concatenates: views are safe


def _repeated(cache, rows: int):
    """The prefix cache for `rows` rows. Layers whose update concatenates get expanded views of the same
    keys and values (no copy: 2.3x faster at 800 tokens, identical logits); any other cache is copied and
    repeated by its own method."""
    layers = getattr(cache, "layers", None)
    if layers is not None and all(type(layer).__name__ in _CONCAT_LAYERS for layer in layers):
        out = copy.copy(cache)
        out.layers = []
        for layer in layers:
            twin = copy.copy(layer)
            if getattr(layer, "is_initialized", True) and isinstance(getattr(layer, "keys", None), torch.Tensor):
                twin.keys = layer.keys.expand(rows, *layer.keys.shape[1:])
                twin.values = layer.values.expand(rows, *layer.values.shape[1:])
            out.layers.append(twin)
        return out
    out = copy.deepcopy(cache)
    if rows > 1:
        out.batch_repeat_interleave(rows)
    return out


def _first_input(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class _Handles:
    """Hook handles removed on leaving a `with` block."""

    def __init__(self, handles: list) -> None:
        self.handles = handles

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


# -- records kept in trace.json, and the CLI ------------------------------------------------------
def _candidates(top: list[tuple[int, str, float]]) -> Candidates:
    return Candidates(ids=[i for i, _, _ in top], labels=[t for _, t, _ in top], probs=[p for _, _, p in top])


def _refs(probe: Probe) -> dict:
    v = probe.vocab
    return {
        "target": TokenRef(id=probe.target, label=v.label(probe.target)),
        "contrast": TokenRef(id=probe.contrast, label=v.label(probe.contrast)),
    }


def record(probe: Probe, effect: Effect, branch: int = 0) -> InterventionRecord:
    """One intervention's result as trace.json keeps it (and the CLI writes it)."""
    one = effect.intervention
    if isinstance(one, tuple):
        raise InterventionError("a record holds one intervention: keep each of several apart")
    frozen = None if effect.frozen_delta is None else probe.before + effect.frozen_delta
    return InterventionRecord(
        step=probe.step,
        branch=branch,
        **_refs(probe),
        part=str(one.target),
        operation=str(one.op),
        steer_texts=list(one.op.texts) if one.op.kind == "steer" and one.op.texts else None,
        source_ids=list(one.op.source) if one.op.kind == "patch" and one.op.source else None,
        scope=one.scope,
        before=Outcome(logit_diff=probe.before, top=_candidates(probe.top(probe.before_logits))),
        after=Outcome(logit_diff=effect.logit_diff, top=_candidates(effect.top)),
        frozen_norm_logit_diff=frozen,
        predicted=Prediction(direct=effect.predicted, note=probe.prediction_error),
    )


def sweep_record(probe: Probe, effects: Sequence[Effect], branch: int = 0) -> SweepRecord:
    """A sweep's measured and predicted changes per head (and MLP), by layer."""
    heads: dict[int, dict[int, Effect]] = {}
    mlps: dict[int, Effect] = {}
    for e in effects:
        t = e.intervention.target
        (heads.setdefault(t.layer, {}).__setitem__(t.head, e) if t.kind == "head" else mlps.__setitem__(t.layer, e))
    layers = sorted(heads)
    rows = [[heads[L][h] for h in sorted(heads[L])] for L in layers]
    has_pred = all(e.predicted is not None for e in effects)
    return SweepRecord(
        step=probe.step,
        branch=branch,
        **_refs(probe),
        operation=str(effects[0].intervention.op) if effects else "zero",
        layers=layers,
        heads=[[e.delta for e in row] for row in rows],
        mlps=[mlps[L].delta for L in layers] if mlps else [],
        predicted_heads=[[e.predicted for e in row] for row in rows] if has_pred else None,
        predicted_mlps=[mlps[L].predicted for L in layers] if has_pred and mlps else None,
        correlation=correlation(effects),
    )


def cli_main(argv: list[str]) -> int:
    """`python -m explorer_core intervene TRACE --step N --ablate PART ...`: exit 0 on success, 2 when it cannot."""
    import argparse
    import json
    import sys

    from . import models
    from . import trace as trace_io
    from .limits import Limits

    p = argparse.ArgumentParser(
        prog="python -m explorer_core intervene",
        description="What if? Change one part of the model at a step of a saved trace and measure the logit "
        "difference (chosen token vs contrast) and the top-k before and after, beside the breakdown's "
        "predicted direct effect. Recomputed with the model named in the trace.",
    )
    p.add_argument("trace", help="Path to trace.json.")
    p.add_argument("--step", type=int, required=True, help="Step to change (0 = first generated token).")
    p.add_argument("--ablate", required=True, help="The part: L.H (a head), L.mlp, embed@P or resid:L@P.")
    p.add_argument(
        "--op",
        default="zero",
        help="zero (default), mean (over the sequence's positions), scale:F, patch (with --source_branch or "
        "--source_prompt) or steer:F (with --steer TOWARDS AWAY, on a resid:L part).",
    )
    p.add_argument(
        "--scope", default="step", choices=SCOPES, help="step: this position only (default); all: every position."
    )
    p.add_argument(
        "--contrast",
        default=None,
        help="Contrast token: an id or one token's text, leading space included; default: the runner-up.",
    )
    p.add_argument("--branch", type=int, default=0, help="Path: 0 = main run, else a branch id.")
    p.add_argument("--source_branch", type=int, default=None, help="--op patch: patch from this path (0 = main run).")
    p.add_argument("--source_prompt", default=None, help="--op patch: patch from this prompt, as many tokens long.")
    p.add_argument("--steer", nargs=2, default=None, metavar=("TOWARDS", "AWAY"), help="--op steer:F: the two texts.")
    p.add_argument("--model", default=None, help="Model to use (default: the one named in the trace).")
    p.add_argument("--out", default=None, help="Write the JSON here (default: print it).")
    args = p.parse_args(argv)
    try:
        iv = Intervention(Target.parse(args.ablate), Op.parse(args.op), args.scope)
        if iv.op.kind == "steer":
            if not args.steer:
                raise InterventionError("--op steer:F needs --steer TOWARDS AWAY (two texts)")
            iv = dataclasses.replace(iv, op=dataclasses.replace(iv.op, texts=tuple(args.steer)))
        trace, lm = trace_and_model(args.trace, args.branch, args.model, Limits.from_env())
        probe = Probe(lm, trace, args.step, args.contrast, args.branch)
        if iv.op.kind == "patch":
            source = patch_source(probe, args.source_branch, args.source_prompt)
            iv = dataclasses.replace(iv, op=dataclasses.replace(iv.op, source=source))
        (effect,) = probe.run([iv])
        result = record(probe, effect, args.branch)
    except (trace_io.TraceError, models.ModelLoadError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result.model_dump(), indent=1))
    return 0


def continue_with(
    probe: Probe, interventions: Sequence[Intervention], room: int | None = None, limits=None, parent=None
):
    """Generation from the probe's step on, with `interventions` kept on at every forward: at the step's
    position and every new one (scope "step"), or at every position, the prefix re-run (scope "all").

    Returns the finished Run; its branch record names the change. The step's own token is chosen by the
    trace's rules from the changed distribution, so the branch may start with the same token or another.
    """
    from .config import GenerationConfig
    from .stepper import Run

    config = GenerationConfig.from_dict(probe.trace.config)
    start = probe.T - 1
    ahead = set(range(start, start + config.max_new_tokens + 2))  # the step's position and every new one
    bound = []
    for one in interventions:
        b = probe.bind(one)
        if one.op.kind == "patch":
            raise InterventionError("patching needs a source at every position: it cannot be kept on while generating")
        bound.append(b if one.scope == "all" else dataclasses.replace(b, positions=ahead))
    if probe.lm.fidelity is None:  # the check must see the model unchanged, so it runs before any hook
        from .stepper import check_fidelity

        check_fidelity(probe.lm)
    fresh = any(one.scope == "all" for one in interventions)  # the prefix changes: no parent cache
    prefix = [s.token_id for s in probe.trace.path_steps(probe.branch)[: probe.step]]
    with probe._offsets(), probe._applied([(bound, False)]):
        run = Run.branch(
            probe.lm,
            config,
            prefix,
            None,
            parent=None if fresh else parent,
            limits=limits,
            prompt_ids=probe.trace.prompt_ids,
            room=room,
        )
        for _ in run:
            probe.passes()
    return run


def branch_with(probe: Probe, run, branch_id: int, interventions: Sequence[Intervention]):
    """The continuation's branch record, naming what was kept on."""
    record = run.branch_record(branch_id, probe.branch)
    return record.model_copy(update={"intervention": "; ".join(str(i) for i in interventions)[:1000]})


def intervention_of(r: InterventionRecord) -> Intervention:
    """The intervention a kept record describes (to replay it)."""
    op = Op.parse(r.operation)
    op = dataclasses.replace(
        op,
        texts=tuple(r.steer_texts) if r.steer_texts else None,
        source=tuple(r.source_ids) if r.source_ids else None,
    )
    return Intervention(Target.parse(r.part), op, r.scope)


def replay(lm: LoadedModel, trace: Trace, cancel: Cancel = None) -> list[dict]:
    """Each kept intervention and sweep made again with `lm`: the largest drift of its figures (logits)."""
    out, probes = [], {}

    def probe_for(step: int, branch: int, contrast: int) -> Probe:
        key = (step, branch, contrast)
        if key not in probes:
            probes.clear()  # one at a time: a probe holds its prefix's cache
            probes[key] = Probe(lm, trace, step, contrast, branch, cancel=cancel)
        return probes[key]

    for i, r in enumerate(trace.interventions):
        probe = probe_for(r.step, r.branch, r.contrast.id)
        (effect,) = probe.run([intervention_of(r)], frozen=r.frozen_norm_logit_diff is not None)
        drift = max(abs(probe.before - r.before.logit_diff), abs(effect.logit_diff - r.after.logit_diff))
        out.append({"kept": f"intervention {i}", "step": r.step, "what": f"{r.operation} {r.part}", "drift": drift})
    for i, w in enumerate(trace.sweeps):
        probe = probe_for(w.step, w.branch, w.contrast.id)
        again = sweep_record(probe, probe.sweep(w.layers, mlps=bool(w.mlps), op=Op.parse(w.operation)), w.branch)
        pairs = [(a, b) for ra, rb in zip(w.heads, again.heads, strict=True) for a, b in zip(ra, rb, strict=True)]
        pairs += list(zip(w.mlps, again.mlps, strict=True))
        drift = max((abs(a - b) for a, b in pairs), default=0.0)
        out.append({"kept": f"sweep {i}", "step": w.step, "what": f"{w.operation}, {len(pairs)} parts", "drift": drift})
    return out


def patch_source(probe: Probe, branch: int | None = None, prompt: str | None = None) -> tuple[int, ...]:
    """A patch's source sequence, as long as the probe's: another path of the trace at the same step, or a
    second prompt (formatted as the trace's was) followed by the same generated tokens."""
    from .config import GenerationConfig
    from .stepper import format_prompt

    tokens = [s.token_id for s in probe.trace.path_steps(probe.branch)[: probe.step]]
    if branch is not None:
        if branch and probe.trace.branch(branch) is None:
            raise InterventionError(f"the trace has no branch {branch} to patch from")
        path = probe.trace.path_steps(branch)
        if len(path) < probe.step:
            raise InterventionError(f"branch {branch} ends before step {probe.step}: patch from a longer path")
        ids = list(probe.trace.prompt_ids) + [s.token_id for s in path[: probe.step]]
        where = f"branch {branch}"
    elif prompt is not None:
        config = GenerationConfig.from_dict(probe.trace.config).replace(prompt=prompt)
        ids = format_prompt(probe.lm.tokenizer, config)[0] + tokens
        where = f"that prompt ({len(ids) - len(tokens)} tokens)"
    else:
        raise InterventionError("a patch needs a source: a branch of the trace or a second prompt")
    if len(ids) != probe.T:
        prompt_len = len(probe.trace.prompt_ids)
        raise InterventionError(
            f"{where} gives {len(ids)} tokens at step {probe.step} and this path {probe.T}: patching needs the same "
            f"length (a second prompt of {prompt_len} tokens as the model reads it, chat template included)"
        )
    return tuple(ids)

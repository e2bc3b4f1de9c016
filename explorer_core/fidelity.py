"""Fidelity check: before anything is shown for a model, prove on a short probe that the tool's numbers
are the model's own, and refuse each feature that is not, with its measured figure.

The probe is a prompt longer than every attention window the config declares (up to MAX_PROBE tokens)
and NEW_TOKENS greedy steps. Against transformers' own references:
- tokens and probabilities: the tool's run (attention and lens recorded) against `model.generate()`
  with the model's own attention implementation;
- attention: every recorded row and the prompt's cells against one uncached forward with eager attention
  and `output_attentions=True`; layers that hand on no weights (state-space, convolution layers of a
  hybrid) must be exactly those for which the model returns none. Where the model's native function
  returns no weights (sdpa), the fast copy (capture.attention_weights) is checked too, and used only
  if it is equal as well;
- lens: the last layer's lens against p_raw at every step;
- explain: the component breakdown's sum against the logit difference at the last step.

A result is cached per model object and, for models loaded from a folder, on disk per weights file,
dtype, device and versions, so the check runs once per model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import capture
from .config import GenerationConfig
from .version import __version__

log = logging.getLogger(__name__)

FEATURES = ("tokens", "attention", "lens", "explain")
MIN_PROBE, MAX_PROBE, NEW_TOKENS = 40, 512, 8
PROBE_TEXT = "The quick brown fox jumps over the lazy dog. Why is the sea salty? 1, 2, 3, 4. "
# |Δ| of a weight, per dtype. In half precision the reference (an uncached eager forward) is itself another
# computation than the model's cached sdpa run: on the default model in bfloat16 they differ by 0.0625
# (one bfloat16 step at 0.5-1); float32 is where the check is sharp.
ROW_TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 1e-1}
PROB_TOLERANCE = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 1e-2}  # |Δ| of a probability
CACHE_FILES = 64  # results kept on disk, newest first (under a KB each)
WINDOW_FIELDS = ("sliding_window", "attention_chunk_size", "window_size", "attention_window", "local_window_size")


@dataclass
class Check:
    feature: str  # one of FEATURES
    ok: bool
    figure: float | None  # the measured largest difference (or the breakdown's error)
    tolerance: float | None
    detail: str  # what was compared, or why the feature is refused


@dataclass
class Fidelity:
    """What the check found for one model; `refusal(feature)` is the sentence a refused feature shows."""

    model: str
    probe_tokens: int
    new_tokens: int
    windows: list[int]
    way: str | None  # capture.WAYS: where recorded weights come from on this model (None: not recordable)
    silent_layers: list[int]  # layers without attention weights
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0

    def get(self, feature: str) -> Check | None:
        return next((c for c in self.checks if c.feature == feature), None)

    def refusal(self, feature: str) -> str | None:
        check = self.get(feature)
        if check is None or check.ok:
            return None
        figure = "" if check.figure is None else f" (measured {check.figure:.3g}, tolerance {check.tolerance:.0e})"
        return f"{self.model}: {feature} refused by the fidelity check{figure}: {check.detail}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Fidelity:
        return cls(**{**data, "checks": [Check(**c) for c in data["checks"]]})


_memo: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> Fidelity, gone with the model


def way_of(lm) -> str:
    """Where a run on this model takes its recorded weights: the fast copy only where the check proved it."""
    return (lm.fidelity.way if lm.fidelity is not None else None) or "own"


def windows_of(config) -> list[int]:
    """Attention windows the config declares (sliding, chunked, local), smallest first."""
    found = set()
    for cfg in (config, getattr(config, "text_config", None)):
        for name in WINDOW_FIELDS:
            value = getattr(cfg, name, None) if cfg is not None else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                found.add(value)
    return sorted(found)


def probe_length(lm, windows: list[int]) -> int:
    want = max([MIN_PROBE] + [w + 16 for w in windows])
    ctx = lm.context_length or MAX_PROBE + NEW_TOKENS
    return max(8, min(want, MAX_PROBE, ctx - NEW_TOKENS))


def check(lm, run_class, use_disk: bool = True) -> Fidelity:
    """Run the probe for a LoadedModel with the step loop `run_class` (stepper.Run), or return the cached
    result. It switches the model's attention implementation for its references: run it before the
    model is shared between threads (stepper.check_fidelity)."""
    if lm.model in _memo:
        return _memo[lm.model]
    path = _disk_path(lm) if use_disk else None
    if path is not None and path.is_file():
        try:
            result = Fidelity.from_dict(json.loads(path.read_text()))
            _memo[lm.model] = result
            return result
        except (ValueError, TypeError, KeyError):
            pass  # an old or damaged record: measure again
    start = time.perf_counter()
    try:
        result = _probe(lm, run_class)
    except Exception as exc:  # noqa: BLE001 - a model the step loop cannot run at all: refused, with why
        result = Fidelity(lm.source.name, 0, 0, windows_of(lm.model.config), None, [], [_failed("tokens", exc)])
    result.seconds = time.perf_counter() - start
    _memo[lm.model] = result
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result.to_dict()))
            _prune(path.parent)
        except OSError as exc:  # a read-only cache only costs the next load another probe
            log.info("fidelity result not cached: %s", exc)
    return result


def _prune(folder: Path) -> None:
    """Keep the newest CACHE_FILES results: a folder per model (tests make many) must not grow for good."""
    files = sorted(folder.glob("*.json"), key=lambda f: f.stat().st_mtime, reverse=True)
    for old in files[CACHE_FILES:]:
        old.unlink(missing_ok=True)


def _disk_path(lm) -> Path | None:
    """A cache file named by the weights' identity, for models loaded from a folder."""
    import transformers

    from .models import cache_dir, converted_dir

    folder = converted_dir() if lm.source.embedded else Path(lm.source.location)  # the folder weights came from
    if not folder.is_dir():
        return None
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        return None
    stamp = [(w.name, w.stat().st_size, w.stat().st_mtime_ns) for w in weights]
    key = json.dumps([str(folder.resolve()), stamp, lm.dtype, lm.device, transformers.__version__, __version__])
    return cache_dir() / "fidelity" / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")


def _probe(lm, Run) -> Fidelity:  # noqa: N803 - the step loop's class, passed in (stepper imports this module)
    windows = windows_of(lm.model.config)
    length = probe_length(lm, windows)
    result = Fidelity(lm.source.name, length, NEW_TOKENS, windows, None, [])
    cfg = _probe_config(lm, length)
    can_record = capture.supports(lm.model) and lm.n_heads > 0
    runs: list = []  # every probe run, so their temporary companions are removed at the end
    try:
        try:
            run = _run(Run, lm, cfg.replace(capture_attention=can_record), "own", runs)
        except Exception as exc:  # noqa: BLE001 - the lens or capture failed on this architecture: find which
            log.info("probe with attention and lens failed: %s", exc)
            run = _separately(Run, lm, cfg, can_record, runs, result)
        else:
            if run.recorder is not None:
                _attention(Run, lm, cfg, run, result, runs)
            result.checks.append(_lens(lm, run))
        if result.get("attention") is None:
            result.checks.append(Check("attention", False, None, None, _why_unrecordable(lm)))
        result.checks.insert(0, _tokens(lm, run))
        result.checks.append(_explain(lm, run))
    finally:
        for r in runs:
            if r.recorder is not None:
                r.recorder.discard()
    return result


def _separately(Run, lm, cfg, can_record: bool, runs: list, result: Fidelity):  # noqa: N803
    """Plain generation, the lens alone and attention alone, each refused with its own error."""
    run = _run(Run, lm, cfg.replace(capture_attention=False, logit_lens=False), "own", runs)
    try:
        result.checks.append(_lens(lm, _run(Run, lm, cfg.replace(capture_attention=False), "own", runs)))
    except Exception as exc:  # noqa: BLE001
        result.checks.append(_failed("lens", exc))
    if can_record:
        try:
            alone = _run(Run, lm, cfg.replace(logit_lens=False), "own", runs)
            _attention(Run, lm, cfg.replace(logit_lens=False), alone, result, runs)
        except Exception as exc:  # noqa: BLE001
            result.checks.append(_failed("attention", exc))
    return run


def _probe_config(lm, length: int) -> GenerationConfig:
    ids = lm.tokenizer(PROBE_TEXT * (length // 8 + 4), add_special_tokens=False)["input_ids"][:length]
    prompt = lm.tokenizer.decode(ids)
    return GenerationConfig(
        model=lm.source.name,
        prompt=prompt,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        block_eos_steps=NEW_TOKENS,
        temperature=0.0,
        top_k=0,
        top_p=1.0,
        repetition_penalty=1.0,
        clean_stop=False,
        chat=False,
        attn_every=0,
        top_n=5,
        logit_lens=True,
    )


def _run(run_class, lm, cfg: GenerationConfig, way: str, runs: list):
    run = run_class(lm, cfg, attention_dtype="float32", check=False)
    runs.append(run)
    if run.recorder is not None:
        run.recorder.way = way
    for _ in run:
        pass
    return run


def _failed(feature: str, exc: Exception) -> Check:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return Check(feature, False, None, None, f"{type(exc).__name__}: {text}")


def _tokens(lm, run) -> Check:
    """Greedy tokens and each chosen token's probability against generate() under the native implementation."""
    model, t, n = lm.model, run.prompt_len, run.n
    prompt = run.ids[:, :t]
    with _implementation(model, capture.native_of(model)), torch.inference_mode():
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    want = out.sequences[0, t:].tolist()
    tol = PROB_TOLERANCE.get(lm.dtype, 1e-2)
    if want != run.output_ids():
        first = next(i for i, (a, b) in enumerate(zip(want, run.output_ids())) if a != b)
        return Check("tokens", False, None, tol, f"tokens differ from generate() from step {first}")
    probs = [float(torch.softmax(lg[0].float(), -1)[tok]) for lg, tok in zip(out.logits, want)]
    figure = max(abs(p - s.p_raw) for p, s in zip(probs, run.steps))
    ok = figure <= tol
    return Check("tokens", ok, figure, tol, f"{n} greedy tokens and their probabilities against generate()")


def _attention(run_class, lm, cfg, run, result: Fidelity, runs: list) -> None:
    """Recorded rows against eager output_attentions; then the fast copy, where the native function gives none."""
    ids = run.ids[:, : run.prompt_len + run.n]
    try:
        reference = reference_attentions(lm.model, ids)
    except Exception as exc:  # noqa: BLE001
        result.checks.append(_failed("attention", exc))
        return
    tol = ROW_TOLERANCE.get(lm.dtype, 1e-2)
    silent = run.recorder.silent_layers()
    figure, detail = compare_rows(run, reference, silent)
    if figure is None or figure > tol:
        result.checks.append(Check("attention", False, figure, tol, detail))
        return
    result.way, result.silent_layers = "own", silent
    if capture.native_of(lm.model) != "eager" and lm.dtype == "float32":
        try:
            fast, _ = compare_rows(_run(run_class, lm, cfg, "fast", runs), reference, silent)
        except Exception as exc:  # noqa: BLE001 - the fast copy is optional: the model's own function stays
            log.info("fast attention copy failed: %s", exc)
            fast = None
        if fast is not None and fast <= tol:
            result.way, figure = "fast", max(figure, fast)
    result.checks.append(Check("attention", True, figure, tol, f"{detail}; recorded with the {result.way} way"))


def reference_attentions(model, ids: torch.Tensor) -> list[np.ndarray]:
    """(heads, q, keys) float32 per layer that returns weights: one uncached eager forward."""
    with _implementation(model, "eager"), torch.inference_mode():
        out = model(input_ids=ids, output_attentions=True, use_cache=False)
    return [a[0].float().cpu().numpy() for a in (out.attentions or ()) if a is not None]


def compare_rows(run, reference: list[np.ndarray], silent: list[int]) -> tuple[float | None, str]:
    """Largest |Δ| between the run's rows and prompt cells and the reference's, with what was compared."""
    store, t = run.attention(), run.prompt_len
    layers = [i for i in range(store.layers) if i not in silent]
    if len(layers) != len(reference):
        return None, (
            f"{len(layers)} layers handed on attention weights but the model returns weights for {len(reference)}"
        )
    worst = 0.0
    edges = store.edges()
    for ref, layer in zip(reference, layers):
        for s in range(store.steps):
            got = store.row_all(s)[layer]  # (heads, T+s)
            worst = max(worst, float(np.abs(got - ref[:, t + s - 1, : t + s]).max()))
        cells = np.stack([store.prompt_cells(layer, h) for h in range(store.heads)])
        worst = max(worst, float(np.abs(cells - _pool(ref[:, :t, :t], edges)).max()))
    for layer in silent:
        worst = max(worst, float(np.abs(store.row_all(store.steps - 1)[layer]).max()))
    return worst, (
        f"{store.steps} steps' rows and the {t}-token prompt's cells of {len(layers)} layers against eager "
        "output_attentions" + (f"; layers {silent} have no attention weights" if silent else "")
    )


def _pool(block: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """(heads, T, T) -> (heads, B, B) means over the store's cells (identity when cells are single positions)."""
    if len(edges) - 1 == block.shape[-1]:
        return block
    sums = np.add.reduceat(np.add.reduceat(block, edges[:-1], axis=1), edges[:-1], axis=2)
    sizes = np.diff(edges)
    return sums / (sizes[:, None] * sizes[None, :])


def _lens(lm, run) -> Check:
    tol = PROB_TOLERANCE.get(lm.dtype, 1e-2)
    figure = max(abs(s.lens.chosen_probs[-1] - s.p_raw) for s in run.steps)
    detail = "the last layer's lens (final norm and the model's own head) against p_raw at every step"
    return Check("lens", figure <= tol, figure, tol, detail)


def _explain(lm, run) -> Check:
    from .explain import ExplainError, explain

    try:
        e = explain(lm, run.trace(), run.n - 1, methods=())
    except ExplainError as exc:
        return Check("explain", False, None, None, str(exc))
    except Exception as exc:  # noqa: BLE001 - an architecture the breakdown cannot hook: refused, named
        return _failed("explain", exc)
    detail = f"the breakdown's parts against the logit difference ({e.logit_diff:.4g}) at step {run.n - 1}"
    tol = 1e-2 * max(1.0, abs(e.logit_diff))
    return Check("explain", e.checks["sum_error"] <= tol, e.checks["sum_error"], tol, detail)


def _why_unrecordable(lm) -> str:
    if lm.n_heads == 0:
        return "the model has no attention heads (an attention-free architecture)"
    return (
        f"{type(lm.model).__name__}'s attention layers compute their weights inside their own forward, not "
        "through transformers' attention interface, which is where this tool reads them"
    )


class _implementation:
    """Switch a model to an attention implementation for a block, and back (used at load, before sharing)."""

    def __init__(self, model, name: str) -> None:
        self.model, self.name = model, name

    def __enter__(self):
        self.before = self.model.config._attn_implementation
        if self.name != self.before:
            self.model.set_attn_implementation(self.name)

    def __exit__(self, *exc):
        if self.model.config._attn_implementation != self.before:
            self.model.set_attn_implementation(self.before)

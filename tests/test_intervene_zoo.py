"""What if? on every architecture of the zoo (tests/zoo.py), windows shorter than the sequence: a probe at a
late step of a greedy trace is either refused in words (ExplainError, InterventionError) or its numbers are
the model's own. Zeroing a head of a middle layer and an MLP, at the step's position and at every position,
must equal an independent implementation: plain forward hooks (a pre-hook on the attention output
projection zeroing the head's slice, a forward hook zeroing the MLP's output) and one plain uncached
forward. Where the breakdown reads the model, the last MLP zeroed with the final norm held moves f by
exactly the prediction; a steer of strength 0 changes nothing. Also: patching a head or an MLP from the
probe's own sequence changes nothing; rows run without the prefix cache give the cached rows' numbers; a
parallel block's last-layer heads, final norm held, move f by exactly the prediction."""

from __future__ import annotations

import functools

import pytest
import torch

from explorer_core import intervene as iv
from explorer_core import models
from explorer_core.config import GenerationConfig
from explorer_core.explain import ExplainError
from explorer_core.stepper import Run
from tests import zoo
from tests.zoo_check import plain_logits as plain

PROMPT = "Cats and dogs are friends. Birds sing in the morning! Why is the sea salty? " * 3  # past every window
NEW, STEP = 8, 6
EXACT, PREDICTED = 1e-4, 1e-3  # relative to max(1, |f|)

NO_BLOCKS = "has no list of decoder blocks or no final norm"
NO_PARTS = "has no attention output projection or no MLP"
# refused by the probe, with the words of the reason: a model that starts or stops being refused fails here
REFUSED = {
    "gpt_neo": NO_PARTS,  # attention output projection under another name (out_proj of attn.attention)
    "lfm2": NO_BLOCKS,
    "mamba": NO_PARTS,
    "mamba2": NO_PARTS,
    "falcon_mamba": NO_PARTS,
    "rwkv": NO_BLOCKS,
    "bamba": NO_PARTS,
    "jamba": NO_PARTS,
    "recurrent_gemma": NO_PARTS,
    "opt": NO_BLOCKS,
    "dbrx": NO_PARTS,
    "qwen3_next": NO_PARTS,
    "qwen3_5_text": NO_PARTS,
    "olmo_hybrid": NO_PARTS,
    "granitemoehybrid": NO_PARTS,
    "lfm2_moe": NO_BLOCKS,
    "zamba2": NO_PARTS,
    "nemotron_h": NO_PARTS,
    "biogpt": NO_PARTS,
    "xglm": NO_PARTS,
}
# no known bugs: a class that fails goes here with its reason, strict, so a fix shows as XPASS
BUGS: dict[str, tuple[str, type | tuple[type, ...]]] = {}
PARALLEL_BUGS: dict[str, tuple[str, type | tuple[type, ...]]] = {}
PATCH_BUGS: dict[str, tuple[str, type | tuple[type, ...]]] = {}
# the residual stream is not one (batch, position, width) tensor: resid targets are refused in words
RESID_REFUSED = {"gemma3n_text"}


def _marked(names, bugs: dict):
    for name in names:
        if name in bugs:
            reason, raises = bugs[name]
            yield pytest.param(name, marks=pytest.mark.xfail(strict=True, raises=raises, reason=reason), id=name)
        else:
            yield pytest.param(name, id=name)


@functools.cache
def _loaded(name: str):
    """The tiny model of `name` and a greedy trace of NEW steps whose prompt is longer than its windows."""
    model, tok = zoo.make(name, zoo.SPECS[name].window)
    models.prepare(model)
    lm = models.LoadedModel.wrap(model, tok, name=name)
    cfg = GenerationConfig(
        model=name, prompt=PROMPT, chat=False, max_new_tokens=NEW, min_new_tokens=NEW, block_eos_steps=NEW,
        clean_stop=False, temperature=0.0, repetition_penalty=1.0, capture_attention=False, logit_lens=False, seed=3,
    )  # fmt: skip
    run = Run(lm, cfg, check=False)  # token ids only: test_zoo checks they are generate()'s
    for _ in run:
        pass
    assert run.n == NEW
    return lm, run.trace()


def _close(got: float, want: float, rel: float) -> bool:
    return abs(got - want) <= rel * max(1.0, abs(want))


@pytest.mark.parametrize("name", list(_marked(zoo.NAMES, BUGS)))
def test_intervention_is_exact_or_refused(name):
    lm, trace = _loaded(name)
    try:
        probe = iv.Probe(lm, trace, STEP)
    except ExplainError as exc:  # InterventionError is one
        assert name in REFUSED, f"{name} refused: {exc}"
        assert REFUSED[name] in str(exc) and type(lm.model).__name__ in str(exc), str(exc)
        return
    assert name not in REFUSED, f"{name} was expected to be refused ({REFUSED[name]}) but a probe was built"

    def f(logits: torch.Tensor) -> float:
        return float(logits[probe.target] - logits[probe.contrast])

    n = len(probe.parts.blocks)
    middle, h = (n - 1) // 2, probe.parts.n_heads // 2
    clean = f(plain(lm, probe.ids, None, None, True))
    assert _close(probe.before, clean, EXACT), (probe.before, clean)
    moved = []
    for scope in ("step", "all"):  # several rows in one run: the cache is batch-repeated where there is one
        head_iv = iv.Intervention(iv.Target("head", middle, h), iv.Op("zero"), scope)
        mlp_iv = iv.Intervention(iv.Target("mlp", middle), iv.Op("zero"), scope)
        got = probe.run([head_iv, mlp_iv], frozen=True)
        for effect, (head, mlp) in zip(got, [((middle, h), None), (None, middle)], strict=True):
            want = f(plain(lm, probe.ids, head, mlp, scope == "step"))
            assert _close(effect.logit_diff, want, EXACT), (str(effect.intervention), effect.logit_diff, want)
            assert effect.delta == pytest.approx(effect.logit_diff - probe.before)
            moved.append(abs(want - clean))
    assert max(moved) > 1e-6, "no change moved f: the hooks found nothing to change"

    steer = iv.Op("steer", 0.0, texts=("happy", "sad"))
    steers = [iv.Intervention(iv.Target("resid", middle), steer, s) for s in ("step", "all")]
    if name in RESID_REFUSED:
        with pytest.raises(iv.InterventionError, match="not \\(batch, position, width\\)"):
            probe.run(steers)
    else:
        for effect in probe.run(steers):
            assert abs(effect.delta) <= EXACT * max(1.0, abs(probe.before)), (str(effect.intervention), effect.delta)

    if probe.components is None:  # interventions stand; the prediction is refused with the breakdown's reason
        assert probe.prediction_error
        return
    (last,) = probe.run([iv.Intervention(iv.Target("mlp", n - 1))], frozen=True)
    assert last.predicted is not None and last.frozen_delta is not None
    assert _close(last.frozen_delta, last.predicted, PREDICTED), (last.frozen_delta, last.predicted)


@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt_oss", "phi"])
def test_without_a_cache_the_numbers_are_the_same(name):
    """A model whose cache cannot be reused runs every row uncached: same numbers as the cached path."""
    lm, trace = _loaded(name)
    probe = iv.Probe(lm, trace, STEP)
    assert probe.cache is not None
    ivs = [iv.Intervention(iv.Target("head", 0, h)) for h in range(probe.parts.n_heads)]
    ivs.append(iv.Intervention(iv.Target("mlp", 0), iv.Op("scale", 0.5)))
    cached = probe.run(ivs)
    probe.cache = None
    uncached = probe.run(ivs)
    for a, b in zip(cached, uncached, strict=True):
        assert _close(a.logit_diff, b.logit_diff, EXACT), (str(a.intervention), a.logit_diff, b.logit_diff)
        assert _close(a.frozen_delta, b.frozen_delta, EXACT), (str(a.intervention), a.frozen_delta, b.frozen_delta)


@pytest.mark.parametrize("name", list(_marked([n for n in zoo.NAMES if n not in REFUSED], PATCH_BUGS)))
def test_patching_from_the_same_sequence_changes_nothing(name):
    lm, trace = _loaded(name)
    probe = iv.Probe(lm, trace, STEP)
    middle = (len(probe.parts.blocks) - 1) // 2
    same = iv.Op("patch", source=tuple(probe.ids))
    targets = [iv.Target("head", middle, 0), iv.Target("mlp", middle)]
    for effect in probe.run([iv.Intervention(t, same, s) for t in targets for s in ("step", "all")], frozen=False):
        assert abs(effect.delta) <= EXACT * max(1.0, abs(probe.before)), (str(effect.intervention), effect.delta)


@pytest.mark.parametrize(
    "name", list(_marked([n for n in zoo.NAMES if "parallel" in zoo.SPECS[n].family], PARALLEL_BUGS))
)
def test_a_parallel_blocks_last_heads_move_f_by_exactly_the_prediction(name):
    """Attention and MLP both read the block's input: a last-layer head reaches f only through the final
    norm, so with the norm held its measured change is its predicted direct effect."""
    lm, trace = _loaded(name)
    probe = iv.Probe(lm, trace, STEP)
    last = len(probe.parts.blocks) - 1
    for effect in probe.run([iv.Intervention(iv.Target("head", last, h)) for h in range(probe.parts.n_heads)]):
        assert abs(effect.frozen_delta - effect.predicted) <= 1e-5 + PREDICTED * abs(effect.predicted), (
            str(effect.intervention), effect.frozen_delta, effect.predicted,
        )  # fmt: skip

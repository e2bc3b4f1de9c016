"""One architecture of the zoo (tests/zoo.py) checked as a user would meet it, against transformers' own
references: what the tool shows must be the model's own number, or the feature is refused with a reason.

`check(name)` returns a row: for each feature (tokens, attention, lens, explain, branch) "exact" with the
largest measured difference, or "refused: <reason>". Anything else (a traceback, a number that differs
from the reference) raises AssertionError. tests/test_zoo.py runs it for every architecture and
tools/zoo_table.py writes the README's table from the same rows.
"""

from __future__ import annotations

import numpy as np
import torch

from explorer_core import models
from explorer_core.config import GenerationConfig
from explorer_core.explain import ExplainError, explain
from explorer_core.fidelity import reference_attentions
from explorer_core.stepper import Run, check_fidelity
from tests import zoo

PROMPT = "Cats and dogs are friends. Birds sing in the morning! Why is the sea salty? " * 3
NEW = 16
SAMPLED = dict(temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.3, no_repeat_ngram_size=3)


def load(name: str, window: int | None = 32) -> models.LoadedModel:
    model, tok = zoo.make(name, window)
    models.prepare(model)
    return check_fidelity(models.LoadedModel.wrap(model, tok, name=name))


def run(lm, **flags) -> Run:
    cfg = GenerationConfig(
        model=lm.source.name, prompt=PROMPT, chat=False, max_new_tokens=NEW, min_new_tokens=NEW,
        block_eos_steps=NEW, clean_stop=False, attn_every=0, seed=3, **flags,
    )  # fmt: skip
    r = Run(lm, cfg, attention_dtype="float32")
    for _ in r:
        pass
    return r


def generate_ids(lm, r: Run, sampled: bool) -> list[int]:
    prompt, t = r.ids[:, : r.prompt_len], r.prompt_len
    kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, attention_mask=torch.ones_like(prompt))
    if sampled:
        torch.manual_seed(r.config.seed)
        kw |= dict(do_sample=True, **{k: SAMPLED[k] for k in ("temperature", "top_k", "top_p")})
        kw |= dict(repetition_penalty=SAMPLED["repetition_penalty"], no_repeat_ngram_size=3)
    else:
        kw |= dict(do_sample=False, repetition_penalty=1.0, no_repeat_ngram_size=0)
    with torch.inference_mode():
        return lm.model.generate(prompt, **kw)[0, t:].tolist()


def refused(lm, feature: str, **flags) -> str:
    """The refusal a user meets when asking for `feature`: a ValueError naming the reason, nothing else."""
    reason = lm.fidelity.refusal(feature)
    assert reason, f"{feature} is neither faithful nor refused"
    try:
        run(lm, **flags)
    except ValueError as exc:
        assert feature in str(exc)
        return "refused: " + lm.fidelity.get(feature).detail
    raise AssertionError(f"{feature} was refused by the check but a run with it went ahead")


def check(name: str, window: int | None = 32) -> dict[str, str]:
    lm = load(name, window)
    row = {"class": type(lm.model).__name__, "implementation": models.capture.native_of(lm.model)}
    if lm.fidelity.refusal("tokens"):
        return row | {"tokens": refused(lm, "tokens")}
    attn = not lm.fidelity.refusal("attention")
    lens = not lm.fidelity.refusal("lens")
    greedy = run(lm, temperature=0.0, repetition_penalty=1.0, capture_attention=attn, logit_lens=lens)
    try:
        return _checked(lm, row, greedy, attn, lens)
    finally:
        if greedy.recorder is not None:  # its temporary companion goes with the check
            greedy.recorder.discard()


def _checked(lm, row: dict, greedy: Run, attn: bool, lens: bool) -> dict[str, str]:
    assert greedy.output_ids() == generate_ids(lm, greedy, False), "greedy tokens differ from generate()"
    sampled = run(lm, capture_attention=False, **SAMPLED)
    assert sampled.output_ids() == generate_ids(lm, sampled, True), "sampled tokens differ from generate()"
    row["tokens"] = "exact"
    row["attention"] = f"exact ({rows_error(lm, greedy):.0e})" if attn else refused(lm, "attention")
    if greedy.recorder is not None and greedy.recorder.silent_layers():
        row["attention"] += f", layers {greedy.recorder.silent_layers()} have none"
    row["lens"] = (
        f"exact ({lens_error(greedy):.0e})" if lens else refused(lm, "lens", capture_attention=False, logit_lens=True)
    )
    row["explain"] = explain_row(lm, greedy)
    row["what_if"] = what_if_row(lm, greedy)
    row["branch"] = branch_row(lm, greedy)
    return row


def what_if_row(lm, r: Run) -> str:
    """A middle layer's head and MLP zeroed at the last step's position, against plain forward hooks; the
    last MLP zeroed with the final norm held against the breakdown's prediction."""
    from explorer_core import intervene as iv

    try:
        probe = iv.Probe(lm, r.trace(), r.n - 1)
    except ExplainError as exc:
        return f"refused: {exc}"
    n = len(probe.parts.blocks)
    middle, h = (n - 1) // 2, probe.parts.n_heads // 2
    f = lambda logits: float(logits[probe.target] - logits[probe.contrast])  # noqa: E731
    ivs = [iv.Intervention(iv.Target("head", middle, h)), iv.Intervention(iv.Target("mlp", middle))]
    got = probe.run(ivs, frozen=False)
    wants = [
        f(plain_logits(lm, probe.ids, (middle, h), None, True)),
        f(plain_logits(lm, probe.ids, None, middle, True)),
    ]
    err = max(abs(e.logit_diff - w) for e, w in zip(got, wants, strict=True))
    assert err < 1e-4 * max(1.0, abs(probe.before)), f"an intervention misses plain hooks by {err}"
    if probe.components is None:
        return f"exact ({err:.0e}); no prediction: {probe.prediction_error}"
    (last,) = probe.run([iv.Intervention(iv.Target("mlp", n - 1))])
    miss = abs(last.frozen_delta - last.predicted)
    assert miss < 1e-3 * max(1.0, abs(last.predicted)), f"the last MLP misses its prediction by {miss}"
    return f"exact ({err:.0e}), prediction exact ({miss:.0e})"


def _rows(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """x as (batch, positions, width): an MoE block may return its output flattened to (batch*positions, d)."""
    return x.view(*like.shape[:-1], x.shape[-1])


def plain_logits(lm, ids: list[int], head: tuple[int, int] | None, mlp: int | None, last_only: bool) -> torch.Tensor:
    """Logits at the last position of one plain uncached forward, with head (layer, h) and/or the MLP of
    layer `mlp` zeroed by plain forward hooks, at the last position only or at every position."""
    from explorer_core.explain import find_parts  # where the modules are; everything else is this file's

    parts = find_parts(lm.model)
    where = slice(-1, None) if last_only else slice(None)
    handles = []
    if head is not None:
        layer, h = head

        def zero_head(_m, args):
            x = args[0].clone()
            width = x.shape[-1] // parts.n_heads
            x[:, where, h * width : (h + 1) * width] = 0
            return (x, *args[1:])

        handles.append(parts.out_proj[layer].register_forward_pre_hook(zero_head))
    if mlp is not None:

        def zero_mlp(_m, args, output):
            out = output[0] if isinstance(output, tuple) else output
            inp = args[0] if args else None
            y = out.clone()
            rows = _rows(y, inp) if inp is not None and y.dim() == 2 else y
            rows[:, where] = 0
            return (y, *output[1:]) if isinstance(output, tuple) else y

        handles.append(parts.mlps[mlp].register_forward_hook(zero_mlp))
    try:
        with torch.inference_mode():
            return lm.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].float()
    finally:
        for handle in handles:
            handle.remove()


def rows_error(lm, r: Run) -> float:
    """Every step's rows and the prompt's cells, every layer and head, against eager output_attentions."""
    store, t = r.attention(), r.prompt_len
    silent = r.recorder.silent_layers()
    reference = reference_attentions(lm.model, r.ids[:, : t + r.n])
    layers = [i for i in range(store.layers) if i not in silent]
    assert len(layers) == len(reference), "layers with weights differ from the model's own"
    assert store.exact_prompt
    worst = 0.0
    for ref, layer in zip(reference, layers):
        for s in range(r.n):
            worst = max(worst, float(np.abs(store.row_all(s)[layer] - ref[:, t + s - 1, : t + s]).max()))
        cells = np.stack([store.prompt_cells(layer, h) for h in range(store.heads)])
        worst = max(worst, float(np.abs(cells - ref[:, :t, :t]).max()))
    assert worst < 1e-4, f"recorded attention differs from eager output_attentions by {worst:.2e}"
    return worst


def lens_error(r: Run) -> float:
    worst = max(abs(s.lens.chosen_probs[-1] - s.p_raw) for s in r.steps)
    assert worst < 1e-4, f"the last layer's lens misses p_raw by {worst:.2e}"
    return worst


def explain_row(lm, r: Run) -> str:
    """Explain checks its own sum on every call and refuses when it misses; the sum is checked again here."""
    try:
        e = explain(lm, r.trace(), r.n - 1, methods=("grad_x_input",))
    except ExplainError as exc:
        return f"refused: {exc}"
    error = abs(sum(map(sum, e.components.heads)) + sum(e.components.mlps) + e.components.embed
                + sum(e.components.attn_bias) + e.components.bias - e.logit_diff)  # fmt: skip
    assert error < 1e-3 * max(1.0, abs(e.logit_diff)), f"breakdown misses the logit difference by {error:.2e}"
    ids = torch.tensor([list(r.ids[0, : r.prompt_len + r.n - 1].tolist())])
    with torch.inference_mode():  # the model's own difference, from a plain forward
        logits = lm.model(input_ids=ids, use_cache=False).logits[0, -1].float()
    own = float(logits[e.target.id] - logits[e.contrast.id])
    cap = e.checks.get("final_softcap")
    shown = cap * np.tanh(e.logit_diff / cap) if cap else e.logit_diff  # a soft-capped split is before the cap
    assert abs(shown - own) < 1e-4 * max(1.0, abs(own)), f"the explained difference {shown} is not the model's {own}"
    return f"exact ({error:.0e})"


def branch_row(lm, r: Run) -> str:
    """A branch from the live run, past every window, against the same branch prefilled from scratch."""
    s = NEW // 2
    prefix, token = r.output_ids()[:s], r.steps[s].top_raw.ids[-1]
    cfg = r.config.replace(capture_attention=False, logit_lens=False)
    live = Run.branch(lm, cfg, prefix, token, parent=r)
    fresh = Run.branch(lm, cfg, prefix, token, parent=None)
    for child in (live, fresh):
        for _ in child:
            pass
    assert live.output_ids() == fresh.output_ids(), "a live branch differs from the same branch prefilled"
    worst = max(abs(a.p_raw - b.p_raw) for a, b in zip(live.steps, fresh.steps))
    assert worst < 1e-4, f"a live branch's probabilities differ by {worst:.2e}"
    return "exact"

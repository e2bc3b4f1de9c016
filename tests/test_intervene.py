"""What if?: interventions equal an independent implementation with plain forward hooks; the breakdown's
prediction is exact where it should be (the last MLP, the final norm held); zeroing every part leaves the
embedding's direct path; a steering strength of 0 changes nothing; bad input is refused in words."""

from __future__ import annotations

import pytest
import torch

from explorer_core import intervene as iv
from explorer_core.config import GenerationConfig
from explorer_core.explain import find_parts
from explorer_core.stepper import generate


@pytest.fixture(scope="module")
def llama_trace(tiny_llama, tiny_llama_dir):
    cfg = GenerationConfig(model=str(tiny_llama_dir), prompt="The sky is blue because", max_new_tokens=6, seed=1)
    cfg = cfg.replace(min_new_tokens=6)
    return generate(tiny_llama, cfg).trace()


@pytest.fixture(scope="module")
def probe(tiny_llama, llama_trace):
    return iv.Probe(tiny_llama, llama_trace, 4)


def plain(lm, ids, edits, last_only: bool) -> torch.Tensor:
    """Logits at the last position of one uncached forward, with `edits` made by plain forward hooks:
    (module, pre, cols, fn); at the last position only, or at every position."""
    handles = []
    for module, pre, cols, fn in edits:

        def change(x, cols=cols, fn=fn):
            x = x.clone()
            where = slice(-1, None) if last_only else slice(None)
            x[:, where, cols] = fn(x[:, where, cols])
            return x

        if pre:
            handles.append(module.register_forward_pre_hook(lambda _m, a, c=change: (c(a[0]), *a[1:])))
        else:
            handles.append(module.register_forward_hook(lambda _m, _a, o, c=change: c(o)))
    try:
        with torch.inference_mode():
            return lm.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
    finally:
        for h in handles:
            h.remove()


def diff(probe, logits) -> float:
    return float(logits[probe.target] - logits[probe.contrast])


@pytest.mark.parametrize("scope", ["step", "all"])
def test_ablations_equal_plain_forward_hooks(tiny_llama, probe, scope):
    parts = find_parts(tiny_llama.model)
    dh = parts.out_proj[1].weight.shape[1] // parts.n_heads
    cases = [
        ("1.2", "zero", (parts.out_proj[1], True, slice(2 * dh, 3 * dh), torch.zeros_like)),
        ("0.mlp", "scale:0.5", (parts.mlps[0], False, slice(None), lambda x: x * 0.5)),
        ("resid:1", "scale:2", (parts.blocks[1], True, slice(None), lambda x: x * 2)),
    ]
    effects = probe.run([iv.Intervention(iv.Target.parse(t), iv.Op.parse(o), scope) for t, o, _ in cases])
    clean = diff(probe, plain(tiny_llama, probe.ids, [], True))
    assert probe.before == pytest.approx(clean, abs=1e-4)
    for (name, _op, edit), effect in zip(cases, effects, strict=True):
        expected = diff(probe, plain(tiny_llama, probe.ids, [edit], scope == "step"))
        assert effect.logit_diff == pytest.approx(expected, abs=1e-4), name
        assert effect.delta != pytest.approx(0.0, abs=1e-6), name  # the change did something


def test_mean_ablation_uses_the_mean_over_the_sequence(tiny_llama, probe):
    parts = find_parts(tiny_llama.model)
    seen = {}
    h = parts.mlps[1].register_forward_hook(lambda _m, _a, o: seen.setdefault("x", o[0].float().mean(0)))
    with torch.inference_mode():
        tiny_llama.model(input_ids=torch.tensor([probe.ids]))
    h.remove()
    mean = seen["x"]
    (effect,) = probe.run([iv.Intervention(iv.Target("mlp", 1), iv.Op("mean"))])
    expected = plain(tiny_llama, probe.ids, [(parts.mlps[1], False, slice(None), lambda x: mean.expand_as(x))], True)
    assert effect.logit_diff == pytest.approx(diff(probe, expected), abs=1e-4)


def test_last_mlp_with_the_norm_held_moves_f_by_exactly_the_prediction(probe):
    last = len(probe.parts.blocks) - 1
    (effect,) = probe.run([iv.Intervention(iv.Target("mlp", last))])
    assert effect.predicted == pytest.approx(-probe.components.mlps[last], abs=1e-5)  # its direct share
    assert effect.frozen_delta == pytest.approx(effect.predicted, abs=1e-4)  # only the final norm reads it
    assert effect.indirect == pytest.approx(0.0, abs=1e-4)
    assert abs(effect.rescaling) > 1e-6  # without the freeze the norm's rescaling shows, and is named


def test_a_last_layer_head_differs_by_what_the_last_mlp_reads_from_it(tiny_llama, probe):
    last = len(probe.parts.blocks) - 1
    (effect,) = probe.run([iv.Intervention(iv.Target("head", last, 1))])
    assert effect.predicted == pytest.approx(-probe.components.heads[last][1], abs=1e-5)
    # the same head ablated with the last MLP's output held at its clean value: then exactly the prediction
    held = probe.last["mlp"][last]
    parts = probe.parts
    dh = parts.out_proj[last].weight.shape[1] // parts.n_heads
    edits = [
        (parts.out_proj[last], True, slice(dh, 2 * dh), torch.zeros_like),
        (parts.mlps[last], False, slice(None), lambda x: held.expand_as(x)),
    ]
    # the final norm held too: its output at the last position with the clean 1/rms
    centred, scale, bias, inv = probe.norm

    def frozen(_m, args, out):
        out = out.clone()
        out[:, -1] = scale * args[0][:, -1].float() * inv + bias
        return out

    h = parts.final_norm.register_forward_hook(frozen)
    try:
        logits = plain(tiny_llama, probe.ids, edits, True)
    finally:
        h.remove()
    assert not centred
    assert diff(probe, logits) - probe.before == pytest.approx(effect.predicted, abs=1e-4)
    assert abs(effect.indirect) > 1e-5  # what the last MLP read from the head


def test_zeroing_every_head_and_mlp_leaves_the_embeddings_direct_path(tiny_llama, probe):
    n = len(probe.parts.blocks)
    ivs = [iv.Intervention(iv.Target("head", L, h), scope="all") for L in range(n) for h in range(probe.parts.n_heads)]
    ivs += [iv.Intervention(iv.Target("mlp", L), scope="all") for L in range(n)]
    effect = probe.run_together(ivs)
    # frozen final norm: exactly the embedding's share (plus the constant biases)
    assert effect.frozen_delta + probe.before == pytest.approx(probe.components.embed + probe.components.bias, abs=1e-4)
    # the model's own norm: the head applied to the normed embedding of the last token
    with torch.inference_mode():
        e = tiny_llama.model.get_input_embeddings()(torch.tensor([[probe.ids[-1]]]))
        logits = tiny_llama.model.get_output_embeddings()(probe.parts.final_norm(e))[0, -1].float()
    assert effect.logit_diff == pytest.approx(diff(probe, logits), abs=1e-4)
    c = probe.components
    assert effect.predicted == pytest.approx(-(sum(map(sum, c.heads)) + sum(c.mlps)), abs=1e-4)


def test_steering_of_strength_zero_changes_nothing(probe):
    op = iv.Op("steer", 0.0, texts=("happy", "sad"))
    effects = probe.run([iv.Intervention(iv.Target("resid", 1), op, scope) for scope in ("step", "all")])
    for effect in effects:
        assert effect.delta == pytest.approx(0.0, abs=1e-5)
    (strong,) = probe.run([iv.Intervention(iv.Target("resid", 1), iv.Op("steer", 8.0, texts=("happy", "sad")))])
    assert abs(strong.delta) > 1e-4


def test_patching_from_the_same_sequence_changes_nothing_and_lengths_must_match(probe):
    same = iv.Op("patch", source=tuple(probe.ids))
    (effect,) = probe.run([iv.Intervention(iv.Target("mlp", 0), same, "all")])
    assert effect.delta == pytest.approx(0.0, abs=1e-4)
    with pytest.raises(iv.InterventionError, match="same length"):
        probe.run([iv.Intervention(iv.Target("mlp", 0), iv.Op("patch", source=(1, 2)))])


def test_sweep_ranks_every_head_and_mlp_and_matches_single_runs(probe):
    effects = probe.sweep()
    n, h = len(probe.parts.blocks), probe.parts.n_heads
    assert len(effects) == n * h + n
    single = probe.run([effects[3].intervention], frozen=False)[0]
    assert single.delta == pytest.approx(effects[3].delta, abs=1e-5)  # batching changes nothing
    r = iv.correlation(effects)
    assert r is not None and -1.0 <= r <= 1.0


@pytest.mark.parametrize(
    ("text", "words"),
    [("9.0", "layer 9 is out of range"), ("0.77", "head 77 is out of range"), ("x.y", "is not a part")],
)
def test_bad_targets_are_refused_in_words(probe, text, words):
    with pytest.raises(iv.InterventionError, match=words):
        probe.run([iv.Intervention(iv.Target.parse(text))])


def test_bad_operations_are_refused_in_words():
    with pytest.raises(iv.InterventionError, match="zero, mean, scale:F"):
        iv.Op.parse("scale:abc")


def test_default_model_prediction_exact_for_the_last_mlp_and_a_sweep_ranks(default_model):
    cfg = GenerationConfig(prompt="The capital of France is", max_new_tokens=3, min_new_tokens=3, chat=False)
    trace = generate(default_model, cfg).trace()
    probe = iv.Probe(default_model, trace, 1)
    last = len(probe.parts.blocks) - 1
    mlp, head = probe.run([iv.Intervention(iv.Target("mlp", last)), iv.Intervention(iv.Target("head", last, 0))])
    assert mlp.frozen_delta == pytest.approx(mlp.predicted, abs=2e-3 * max(1.0, abs(mlp.predicted)))
    assert abs(mlp.rescaling) > 1e-3  # the real model's norm rescales visibly
    assert head.predicted == pytest.approx(-probe.components.heads[last][0], abs=1e-3)
    effects = probe.sweep(layers=[last])
    assert len(effects) == probe.parts.n_heads + 1


def test_cli_intervene_writes_the_documented_json(tiny_llama_dir, llama_trace, tmp_path):
    import json

    from explorer_core import tracefile
    from explorer_core.cli import main

    path = tmp_path / "trace.json"
    tracefile.save(llama_trace, None, path)
    out = tmp_path / "effect.json"
    code = main(["intervene", str(path), "--step", "3", "--ablate", "1.mlp", "--op", "scale:0", "--out", str(out)])
    assert code == 0
    got = json.loads(out.read_text())
    assert got["step"] == 3 and got["part"] == "1.mlp" and got["scope"] == "step"
    assert got["target"]["id"] == llama_trace.steps[3].token_id and set(got["contrast"]) == {"id", "label"}
    assert set(got["before"]) == set(got["after"]) == {"logit_diff", "top"}
    assert got["predicted"]["direct"] is not None
    assert got["before"]["logit_diff"] != got["after"]["logit_diff"]
    assert main(["intervene", str(path), "--step", "3", "--ablate", "7.mlp"]) == 2  # out of range, in words


def test_kept_interventions_and_sweeps_round_trip_and_are_checked(probe, llama_trace):
    from explorer_core import trace as trace_io

    (effect,) = probe.run([iv.Intervention(iv.Target("head", 1, 0))])
    kept = llama_trace.model_copy(
        update={"interventions": [iv.record(probe, effect)], "sweeps": [iv.sweep_record(probe, probe.sweep())]}
    )
    back = trace_io.Trace.model_validate_json(kept.model_dump_json())
    assert back.interventions[0].after.logit_diff == pytest.approx(effect.logit_diff)
    assert len(back.sweeps[0].heads) == len(probe.parts.blocks)
    bad = kept.model_dump()
    bad["sweeps"][0]["layers"] = [99] * len(bad["sweeps"][0]["layers"])
    with pytest.raises(ValueError, match="layers must be of the model"):
        trace_io.Trace.model_validate(bad)


def _button(at, label: str):
    return next(b for b in at.button if b.label == label)


def test_app_what_if_tab_measures_sweeps_and_keeps(generated):
    from tests.apphelp import chart_titles

    at = generated
    at.slider(key="gen_step").set_value(5).run()
    at.text_input(key="gen_whatif_part").input("1.mlp")
    _button(at, "Measure").click().run()
    assert not at.exception, at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert {"Before", "After (measured)", "Predicted (direct share)", "Gap (measured − predicted)"} <= set(metrics)
    assert metrics["Before"] != metrics["After (measured)"]
    assert any("final norm's rescaling" in c.value for c in at.caption)
    _button(at, "Sweep: change each part alone").click().run()
    assert not at.exception, at.exception
    titles = chart_titles(at)
    assert "Measured: part changed" in titles and "Predicted: direct share" in titles
    assert any("Correlation of measured and predicted" in c.value for c in at.caption)
    _button(at, "Keep this result in the trace (saved with it)").click().run()
    _button(at, "Keep this sweep in the trace (saved with it)").click().run()
    trace = at.session_state["gen_trace"][0]
    assert len(trace.interventions) == 1 and len(trace.sweeps) == 1
    assert trace.interventions[0].part == "1.mlp" and trace.interventions[0].step == 5
    # continue generating with the change on: a new branch naming it
    go_on = next(b for b in at.button if b.label.startswith("Continue generating with this change on"))
    go_on.click().run()
    assert not at.exception, at.exception
    trace = at.session_state["gen_trace"][0]
    assert len(trace.branches) == 1 and trace.branches[0].at_step == 5
    assert trace.branches[0].intervention == "zero 1.mlp (this position)"
    assert any("with this change kept on: zero 1.mlp" in t.value for t in at.text)
    # a bad part is refused in words, and the kept results stay
    at.text_input(key="gen_whatif_part").input("99.mlp")
    _button(at, "Measure").click().run()
    assert not at.exception, at.exception
    assert any("layer 99 is out of range" in t.value for t in at.text)


@pytest.mark.parametrize("scope", ["step", "all"])
def test_continuing_with_an_intervention_equals_generate_on_a_patched_model(tiny_llama, scope):
    n, at = 10, 3
    cfg = GenerationConfig(
        model="x",
        prompt="Why is the sea salty?",
        max_new_tokens=n,
        min_new_tokens=n,
        block_eos_steps=n,
        block_ws_steps=0,
        temperature=0.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        capture_attention=False,
    )
    trace = generate(tiny_llama, cfg).trace()
    probe = iv.Probe(tiny_llama, trace, at)
    change = iv.Intervention(iv.Target("head", 1, 2), iv.Op("zero"), scope)
    run = iv.continue_with(probe, [change])
    record = iv.branch_with(probe, run, 1, [change])
    assert record.at_step == at and record.intervention == str(change)
    parts = probe.parts
    dh = parts.out_proj[1].weight.shape[1] // parts.n_heads
    first = probe.T - 1

    def zero(_m, args):
        x = args[0].clone()
        if scope == "all" or x.shape[1] == 1:
            x[:, :, 2 * dh : 3 * dh] = 0
        else:  # the prefill of generate: from the step's position on
            x[:, first:, 2 * dh : 3 * dh] = 0
        return (x, *args[1:])

    h = parts.out_proj[1].register_forward_pre_hook(zero)
    try:
        prompt = torch.tensor([probe.ids])
        out = tiny_llama.model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=n - at,
            min_new_tokens=n - at,
        )
    finally:
        h.remove()
    assert [s.token_id for s in record.steps] == out[0, probe.T :].tolist()
    assert abs(probe.run([change], frozen=False)[0].delta) > 1e-4  # the change bites at the step


def test_replay_makes_kept_results_again_and_reports_drift(probe, llama_trace, tmp_path, capsys):
    from explorer_core import tracefile
    from explorer_core.cli import main

    steer = iv.Intervention(iv.Target("resid", 1), iv.Op("steer", 2.0, texts=("happy", "sad")))
    mean = iv.Intervention(iv.Target("head", 0, 1), iv.Op("mean"), "all")
    records = [iv.record(probe, e) for e in probe.run([steer, mean])]
    assert iv.intervention_of(records[0]) == steer and iv.intervention_of(records[1]) == mean
    sweep = iv.sweep_record(probe, probe.sweep(layers=[1]))
    kept = llama_trace.model_copy(update={"interventions": records, "sweeps": [sweep]})
    path = tmp_path / "trace.json"
    tracefile.save(kept, None, path)
    capsys.readouterr()
    assert main(["replay", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.count(" ok") >= 3 and "DRIFTED" not in out and "steer:2 resid:1" in out
    bad = records[0].model_copy(update={"after": records[0].after.model_copy(update={"logit_diff": 99.0})})
    tracefile.save(kept.model_copy(update={"interventions": [bad, records[1]]}), None, path)
    assert main(["replay", str(path)]) == 1
    assert "DRIFTED" in capsys.readouterr().out


def test_patching_the_final_residual_gives_the_source_runs_logits(tiny_llama, probe):
    source = list(probe.ids)
    source[1] = (source[1] + 7) % 300  # another token at position 1: the same length
    n = len(probe.parts.blocks)
    with torch.inference_mode():
        expected = tiny_llama.model(input_ids=torch.tensor([source])).logits[0, -1].float()
    for scope in ("step", "all"):
        one = iv.Intervention(iv.Target("resid", n), iv.Op("patch", source=tuple(source)), scope)
        (effect,) = probe.run([one])
        assert effect.logit_diff == pytest.approx(diff(probe, expected), abs=1e-4)
        assert effect.delta != pytest.approx(0.0, abs=1e-6)


def test_patch_sources_from_a_branch_or_a_second_prompt(tiny_llama, probe, llama_trace, tmp_path, capsys):
    from explorer_core import tracefile
    from explorer_core.cli import main

    assert iv.patch_source(probe, branch=0) == tuple(probe.ids)  # the main run itself
    with pytest.raises(iv.InterventionError, match="same length"):
        iv.patch_source(probe, prompt="A much longer second prompt than the first one, by far and away")
    same = llama_trace.config["prompt"]  # the same prompt: as many tokens
    assert len(iv.patch_source(probe, prompt=same)) == probe.T
    path = tmp_path / "trace.json"
    tracefile.save(llama_trace, None, path)
    argv = ["intervene", str(path), "--step", "4", "--ablate", "1.mlp", "--op", "patch", "--source_prompt", same]
    assert main(argv) == 0
    import json

    got = json.loads(capsys.readouterr().out)
    assert got["operation"] == "patch" and len(got["source_ids"]) == probe.T
    assert got["after"]["logit_diff"] == pytest.approx(got["before"]["logit_diff"], abs=1e-4)
    assert main([*argv[:-1], "x"]) == 2
    assert "same length" in capsys.readouterr().err


def test_notebook_what_if_and_sweep_are_kept_and_saved(tiny_llama, tmp_path):
    import explorer_core
    from explorer_core.notebook import Trace as NotebookTrace

    t = explorer_core.watch(tiny_llama.model, "Why is the sea salty?", tokenizer=tiny_llama.tokenizer, max_new_tokens=5)
    r = t.what_if(2, "1.mlp", op="scale:0")
    assert r.step == 2 and r.part == "1.mlp" and r.predicted.direct is not None
    w = t.sweep(2, layers=[0])
    assert w.layers == [0] and len(w.heads[0]) == tiny_llama.n_heads
    assert t.interventions == [r] and t.sweeps == [w]
    back = NotebookTrace.load(t.save(tmp_path / "run"))
    assert back.interventions[0].after.logit_diff == pytest.approx(r.after.logit_diff)
    assert len(back.sweeps) == 1
    assert "What if?" in back._repr_html_()  # the inline view lists them


def test_export_shows_kept_interventions_and_sweeps(probe, llama_trace):
    import json
    import re

    from explorer_core import export_html

    (effect,) = probe.run([iv.Intervention(iv.Target("mlp", 1))])
    kept = llama_trace.model_copy(
        update={"interventions": [iv.record(probe, effect)], "sweeps": [iv.sweep_record(probe, probe.sweep())]}
    )
    page = export_html.build(kept, None, vega_js="")
    assert "<h2>What if?</h2>" in page and "zero 1.mlp" in page and 'id="sweep0m"' in page
    data = json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S)[1])
    (sweep,) = data["sweeps"]
    assert sweep["measured"] and sweep["predicted"]
    assert "What if?" not in export_html.build(llama_trace, None, vega_js="")  # nothing kept: no section


def test_rows_per_forward_are_cut_to_the_memory_budget(tiny_llama, llama_trace, probe, monkeypatch):
    monkeypatch.setattr(iv, "BATCH_MB", 0)  # less than one row: one row per forward, never zero
    small = iv.Probe(tiny_llama, llama_trace, 4)
    assert small.rows_per_cache == 1 and small.rows_uncached == 1
    assert probe.rows_per_cache == iv.BATCH  # the tiny model's rows fit 16 at a time in 256 MB
    a, b = small.sweep(layers=[1]), probe.sweep(layers=[1])
    assert [e.delta for e in a] == pytest.approx([e.delta for e in b], abs=1e-5)

"""Which rule removed a candidate, logit lens, branches, replay check and one-file HTML export."""

from __future__ import annotations

import json
import re

import pytest

from explorer_core import frames, tracefile
from explorer_core import trace as trace_io
from explorer_core.cli import main as cli_main
from explorer_core.config import GenerationConfig
from explorer_core.export_html import build
from explorer_core.markup import escape_text
from explorer_core.replay import replay
from explorer_core.stepper import Run, generate
from tests.apphelp import chart_titles, start, use_model


def test_stage_track_runs_from_raw_to_processed(tiny_llama):
    cfg = GenerationConfig(
        model="x", max_new_tokens=6, min_new_tokens=6, top_k=3, top_p=0.9, temperature=0.7, repetition_penalty=1.3
    )
    run = generate(tiny_llama, cfg)
    removed_by_top_k = set()
    for s in run.steps:
        tr = s.stages
        assert tr.stages == ["raw", "repetition", "block_eos", "temperature", "top_k", "top_p"]
        assert tiny_llama.tokenizer.eos_token_id in tr.ids and s.token_id in tr.ids
        for i, tid in enumerate(tr.ids):
            if tid in s.top_raw.ids:
                assert tr.probs[0][i] == pytest.approx(s.top_raw.probs[s.top_raw.ids.index(tid)], abs=1e-6)
            if tid in s.top_proc.ids:
                assert tr.probs[-1][i] == pytest.approx(s.top_proc.probs[s.top_proc.ids.index(tid)], abs=1e-6)
        eos = tr.ids.index(tiny_llama.tokenizer.eos_token_id)
        assert tr.probs[2][eos] == 0.0  # EOS blocking removed it
        summary = frames.stage_summary(s).set_index("token_id")
        k = tr.stages.index("top_k")
        for i, tid in enumerate(tr.ids):
            if tr.probs[k - 1][i] > 0 and tr.probs[k][i] == 0 and tr.probs[1][i] > 0:
                assert summary.loc[tid, "verdict"].startswith("removed by top-k")
                removed_by_top_k.add(s.step)
        assert summary.loc[tiny_llama.tokenizer.eos_token_id, "verdict"].startswith("removed by EOS blocking")
    assert removed_by_top_k  # top_k=3 removes tracked candidates at some step


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_logit_lens_last_layer_is_the_model(fixture, request):
    lm = request.getfixturevalue(fixture)
    run = generate(lm, GenerationConfig(model="x", max_new_tokens=5, min_new_tokens=5, logit_lens=True))
    for s in run.steps:
        assert len(s.lens.chosen_probs) == lm.n_layers
        assert s.lens.chosen_probs[-1] == pytest.approx(s.p_raw, abs=1e-5)  # last layer: no double norm
        assert s.lens.top_ids[-1] == s.top_raw.ids[0]


def test_logit_lens_off_by_default(tiny_llama):
    assert generate(tiny_llama, GenerationConfig(model="x", max_new_tokens=2)).steps[0].lens is None


@pytest.mark.parametrize("use_cache", [True, False])
def test_branch_with_the_same_token_reproduces_greedy_run(tiny_llama, use_cache):
    cfg = GenerationConfig(model="x", max_new_tokens=12, min_new_tokens=12, temperature=0.0)
    main = generate(tiny_llama, cfg)
    s = 5
    child = Run.branch(tiny_llama, cfg, main.output_ids()[:s], main.output_ids()[s], parent=main if use_cache else None)
    for _ in child:
        pass
    assert child.output_ids() == main.output_ids()
    for a, b in zip(child.steps, main.steps[s:]):
        assert a.step == b.step and a.p_raw == pytest.approx(b.p_raw, abs=1e-5)
    assert child.steps[0].forced and not child.steps[1].forced


def test_branch_tree_round_trips(tiny_llama, tmp_path):
    cfg = GenerationConfig(model="x", max_new_tokens=10, min_new_tokens=10, seed=9)
    main = generate(tiny_llama, cfg)
    other = next(i for i in main.steps[3].top_raw.ids if i != main.steps[3].token_id)
    b1 = Run.branch(tiny_llama, cfg, main.output_ids()[:3], other, parent=main)
    for _ in b1:
        pass
    assert b1.output_ids()[3] == other and b1.steps[0].step == 3
    trace = main.trace()
    trace = trace.model_copy(update={"branches": [b1.branch_record(1, 0)]})
    path1 = [s.token_id for s in trace.path_steps(1)]
    b2 = Run.branch(tiny_llama, cfg, path1[:6], path1[6])  # a branch of the branch, from a saved path
    for _ in b2:
        pass
    trace = trace.model_copy(update={"branches": trace.branches + [b2.branch_record(2, 1)]})
    loaded, _ = tracefile.load(tracefile.save(trace, main.attention(), tmp_path / "trace.json"))
    assert [b.parent for b in loaded.branches] == [0, 1]
    assert [s.token_id for s in loaded.path_steps(2)] == b2.output_ids()
    assert [s.token_id for s in loaded.path_steps(1)][:3] == main.output_ids()[:3]


def test_branch_validation_rejects_bad_tree(tiny_llama):
    run = generate(tiny_llama, GenerationConfig(model="x", max_new_tokens=4, min_new_tokens=4))
    trace = run.trace()
    data = json.loads(trace.model_dump_json())
    data["branches"] = [{"id": 1, "parent": 7, "at_step": 0, "steps": [], "stop_reason": "eos", "output_text": ""}]
    with pytest.raises(trace_io.TraceError, match="unknown parent 7"):
        trace_io.parse(json.dumps(data))


def test_replay_is_faithful_and_catches_tampering(tiny_llama, tmp_path):
    run = generate(
        tiny_llama,
        GenerationConfig(
            model="x", max_new_tokens=10, min_new_tokens=10, no_repeat_ngram_size=2, repetition_penalty=1.4
        ),
    )
    trace = run.trace()
    report = replay(tiny_llama, trace)
    assert report.max_diff <= 1e-4 and report.verdict.startswith("faithful")
    steps = list(trace.steps)
    steps[4] = steps[4].model_copy(update={"p_raw": min(1.0, steps[4].p_raw + 0.2)})
    bad = replay(tiny_llama, trace.model_copy(update={"steps": steps}))
    assert bad.verdict.startswith("different") and bad.per_step["max_diff_raw"].idxmax() == 4


def test_cli_replay_subcommand(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        cli_main(
            ["--model", str(tiny_llama_dir), "--max_new_tokens", "8", "--out_dir", str(out), "--no_png", "-q", "--html"]
        )
        == 0
    )
    assert cli_main(["replay", str(out / "trace.json")]) == 0
    assert "faithful" in capsys.readouterr().out
    assert (out / "trace.html").stat().st_size > 100_000


def test_html_export_is_self_contained_and_escaped(tiny_llama):
    run = generate(tiny_llama, GenerationConfig(model="x", max_new_tokens=4, min_new_tokens=4))
    trace = run.trace()
    steps = [s.model_copy(update={"label": "<img src=x onerror=alert(1)>"}) for s in trace.steps]
    page = build(trace.model_copy(update={"steps": steps}), run.attention())
    assert "<img" not in page.replace("<img src=x onerror", "") or "<img src=x onerror" not in page
    assert escape_text("<img src=x onerror=alert(1)>") in page
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=", page)  # nothing fetched from outside
    assert page.count("</script>") == 3  # the bundle, the data block and the page script: none closed early
    assert "vegaEmbed" in page


def test_app_rule_lens_branch_and_replay(tiny_llama_dir):
    at = use_model(start(), tiny_llama_dir, max_new_tokens=6, min_new_tokens=6, logit_lens=True)
    at.button(key="gen_generate").click().run()
    assert not at.exception, at.exception
    titles = chart_titles(at)
    assert "Each candidate through the processing chain" in titles
    assert "Logit lens: each layer's top token" in titles
    assert any(df.value.columns.tolist()[-1] == "verdict" for df in at.dataframe)
    at.slider(key="gen_step").set_value(2).run()
    trace, _ = at.session_state["gen_trace"]
    other = next(i for i in trace.steps[2].top_proc.ids if i != trace.steps[2].token_id)
    at.selectbox(key="gen_trace_branch_pick").set_value(other)
    at.button(key="FormSubmitter:gen_trace_branch_form-Continue from here").click().run()
    assert not at.exception, at.exception
    trace, _ = at.session_state["gen_trace"]
    assert len(trace.branches) == 1 and trace.branches[0].steps[0].token_id == other
    assert any("Branch 1 splits from the main run at step 2" in t.value for t in at.text)
    at.radio(key="gen_path").set_value(1).run()
    assert not at.exception
    at.button(key="gen_replay").click().run()
    assert any(t.value.startswith("faithful") for t in at.text)

"""'Why this token?': the breakdown sums to the logit difference, which matches an independent forward; each
attribution method passes a known-answer case; IG is complete; bad input gets a clear message; CLI and app."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from explorer_core import charts, explain, frames, models, tracefile
from explorer_core import trace as trace_io
from explorer_core.cli import main as cli_main
from explorer_core.config import GenerationConfig
from explorer_core.stepper import generate
from tests.apphelp import chart_titles, start, use_model


def _trace(lm, name: str, n: int = 6, prompt: str = "The sky is blue because"):
    cfg = GenerationConfig(model=name, prompt=prompt, max_new_tokens=n, min_new_tokens=n, seed=1)
    return generate(lm, cfg).trace()


def _independent_diff(lm, trace, step: int, target: int, other: int) -> float:
    """Teacher-forced forward without hooks, all logits kept."""
    ids = trace.prompt_ids + [s.token_id for s in trace.steps[:step]]
    with torch.inference_mode():
        logits = lm.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
    return float(logits[target] - logits[other])


def _parts_sum(c) -> float:
    return c.embed + sum(map(sum, c.heads)) + sum(c.mlps) + sum(c.attn_bias) + c.bias


@pytest.fixture(scope="module")
def llama_trace(tiny_llama, tiny_llama_dir):
    return _trace(tiny_llama, str(tiny_llama_dir))


@pytest.fixture(scope="module")
def gpt2_trace(tiny_gpt2, tiny_gpt2_dir):
    return _trace(tiny_gpt2, str(tiny_gpt2_dir))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_breakdown_sums_to_an_independent_forward(kind, request):
    lm, trace = request.getfixturevalue(f"tiny_{kind}"), request.getfixturevalue(f"{kind}_trace")
    for step in range(len(trace.steps)):
        e = explain.explain(lm, trace, step, methods=())
        assert abs(e.logit_diff - _independent_diff(lm, trace, step, e.target.id, e.contrast.id)) < 1e-3
        c = e.components
        assert len(c.heads) == lm.n_layers and all(len(r) == lm.n_heads for r in c.heads)
        assert c.bias == 0.0 and not any(c.attn_bias)  # no biases in tiny llama; GPT-2 initialises them to 0
        assert abs(c.embed + sum(map(sum, c.heads)) + sum(c.mlps) - e.logit_diff) < 1e-2


def test_gpt2_biases_are_their_own_parts(tiny_gpt2_dir, gpt2_trace):
    lm = models.load(str(tiny_gpt2_dir))  # a private copy: the biases are changed below
    torch.manual_seed(0)
    with torch.no_grad():
        for block in lm.model.transformer.h:
            block.attn.c_proj.bias.normal_(0, 0.5)
        lm.model.transformer.ln_f.bias.normal_(0, 0.5)
    e = explain.explain(lm, gpt2_trace, 2, methods=())
    assert abs(e.components.bias) > 1e-3 and any(abs(v) > 1e-3 for v in e.components.attn_bias)
    assert abs(e.logit_diff - _independent_diff(lm, gpt2_trace, 2, e.target.id, e.contrast.id)) < 1e-3
    assert abs(_parts_sum(e.components) - e.logit_diff) < 1e-2


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_integrated_gradients_is_complete(kind, request):
    lm, trace = request.getfixturevalue(f"tiny_{kind}"), request.getfixturevalue(f"{kind}_trace")
    e = explain.explain(lm, trace, 4)
    assert e.checks["integrated_gradients_completeness_error"] < 0.05
    assert set(e.inputs.methods) == set(explain.METHODS)
    assert all(len(v) == trace.prompt_len + 4 for v in e.inputs.methods.values())


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_gradients_recompute_blocks_instead_of_keeping_them(kind, request):
    """Explaining keeps each block's input, not its activations (a 1,012-token prompt once took the hosted
    app to 3.8 GB): the same gradients, far fewer saved bytes, and each block's own forward back after."""
    lm = request.getfixturevalue(f"tiny_{kind}")
    blocks = explain.find_parts(lm.model).blocks
    f = explain.logit_diff_fn(lm.model, 5, 6)
    with torch.no_grad():
        x = lm.model.get_input_embeddings()(torch.arange(3, 43)[None]).float().expand(2, -1, -1).contiguous()

    def grad_and_saved_bytes():
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t

        points = x.clone().requires_grad_(True)
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            (g,) = torch.autograd.grad(f(points).sum(), points)
        return g, sum(saved)

    kept, kept_bytes = grad_and_saved_bytes()
    with explain.recomputed_blocks(blocks):
        again, recomputed_bytes = grad_and_saved_bytes()
    assert torch.allclose(again, kept, rtol=1e-5, atol=1e-7)
    assert recomputed_bytes < kept_bytes / 3, (recomputed_bytes, kept_bytes)
    assert all("forward" not in b.__dict__ for b in blocks)  # the class's forward again


def _silence_attention(lm, keep: tuple[int, int] | None = None) -> None:
    """Zero every attention output projection, except one (layer, head) slice when `keep` is given."""
    parts = explain.find_parts(lm.model)
    dh = parts.out_proj[0].weight.shape[1] // parts.n_heads
    with torch.no_grad():
        for layer, proj in enumerate(parts.out_proj):
            saved = proj.weight.clone()
            proj.weight.zero_()
            if keep is not None and keep[0] == layer:
                cols = slice(keep[1] * dh, (keep[1] + 1) * dh)
                proj.weight[:, cols] = saved[:, cols]


def test_known_answer_only_the_last_position_can_matter(tiny_llama_dir, llama_trace):
    """With every attention output zeroed no position but the last reaches the logits: both methods must give
    every other position exactly 0, and IG must give the last one all of f(input) - f(baseline)."""
    lm = models.load(str(tiny_llama_dir))
    _silence_attention(lm)
    e = explain.explain(lm, llama_trace, 3)
    for method, scores in e.inputs.methods.items():
        assert all(v == 0.0 for v in scores[:-1]), method
        assert abs(scores[-1]) > 1e-4, method
    ids = llama_trace.prompt_ids + [s.token_id for s in llama_trace.steps[:3]]
    f = explain.logit_diff_fn(lm.model, e.target.id, e.contrast.id)
    x = torch.tensor([ids])
    with torch.no_grad():
        gap = float(f(lm.model.get_input_embeddings()(x))[0] - f(explain.baseline_embeds(lm.model, x))[0])
    assert abs(e.inputs.methods["integrated_gradients"][-1] - gap) < 0.05 * abs(gap)
    assert all(v == 0.0 for row in e.components.heads for v in row)


def test_known_answer_grad_x_input_is_the_directional_derivative(tiny_llama_dir, llama_trace):
    """Gradient x input at the one position that matters equals d/da f(a * x) at a = 1 (finite differences)."""
    lm = models.load(str(tiny_llama_dir))
    _silence_attention(lm)
    e = explain.explain(lm, llama_trace, 3, methods=("grad_x_input",))
    ids = torch.tensor([llama_trace.prompt_ids + [s.token_id for s in llama_trace.steps[:3]]])
    f = explain.logit_diff_fn(lm.model, e.target.id, e.contrast.id)
    with torch.no_grad():
        x = lm.model.get_input_embeddings()(ids).double().float()
        h = 1e-2
        up, down = x.clone(), x.clone()
        up[:, -1] *= 1 + h
        down[:, -1] *= 1 - h
        numeric = float(f(up)[0] - f(down)[0]) / (2 * h)
    assert abs(e.inputs.methods["grad_x_input"][-1] - numeric) < 1e-2 * max(1.0, abs(numeric))


def test_known_answer_one_earlier_position_decides(tiny_llama_dir, llama_trace):
    """Every token's embedding is zeroed except one that occurs once, at position j: every other position equals
    the baseline, so both methods must give it exactly 0, and IG must give position j all of f(x) - f(baseline)."""
    lm = models.load(str(tiny_llama_dir))
    ids = llama_trace.prompt_ids + [s.token_id for s in llama_trace.steps[:3]]
    j = next(i for i in range(1, len(ids) - 1) if ids.count(ids[i]) == 1)
    with torch.no_grad():
        table = lm.model.get_input_embeddings().weight
        row = table[ids[j]].clone()
        table.zero_()
        table[ids[j]] = row
    e = explain.explain(lm, llama_trace, 3)
    for method, scores in e.inputs.methods.items():
        assert all(v == 0.0 for i, v in enumerate(scores) if i != j), method
        assert abs(scores[j]) > 1e-6, method
    f = explain.logit_diff_fn(lm.model, e.target.id, e.contrast.id)
    x = torch.tensor([ids])
    with torch.no_grad():
        gap = float(f(lm.model.get_input_embeddings()(x))[0] - f(explain.baseline_embeds(lm.model, x))[0])
    assert abs(e.inputs.methods["integrated_gradients"][j] - gap) < 0.05 * abs(gap)


def test_known_answer_one_head_writes(tiny_llama_dir, llama_trace):
    lm = models.load(str(tiny_llama_dir))
    _silence_attention(lm, keep=(1, 2))
    e = explain.explain(lm, llama_trace, 3, methods=())
    heads = e.components.heads
    assert abs(heads[1][2]) > 1e-5
    assert all(v == 0.0 for layer, row in enumerate(heads) for head, v in enumerate(row) if (layer, head) != (1, 2))
    assert abs(_parts_sum(e.components) - e.logit_diff) < 1e-2


def test_bad_input_is_named(tiny_llama, llama_trace):
    last = len(llama_trace.steps)
    with pytest.raises(explain.ExplainError, match=f"step {last} is out of range"):
        explain.explain(tiny_llama, llama_trace, last)
    chosen = llama_trace.steps[1].token_id
    with pytest.raises(explain.ExplainError, match="is the chosen token itself"):
        explain.explain(tiny_llama, llama_trace, 1, contrast=chosen)
    with pytest.raises(explain.ExplainError, match="is the chosen token itself"):
        explain.explain(tiny_llama, llama_trace, 1, contrast=str(chosen))
    with pytest.raises(explain.ExplainError, match="tokens for this tokenizer"):
        explain.explain(tiny_llama, llama_trace, 1, contrast="The sky is blue because air")
    with pytest.raises(explain.ExplainError, match="unknown attribution method"):
        explain.explain(tiny_llama, llama_trace, 1, methods=("saliency",))


def test_model_without_the_expected_modules(tiny_llama_dir, llama_trace):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=50)
    assert len(explain.find_parts(GPTNeoXForCausalLM(cfg)).blocks) == 2  # parallel attention + MLP: found
    lm = models.load(str(tiny_llama_dir))
    del lm.model.model.layers[1].self_attn.o_proj
    with pytest.raises(explain.ExplainError, match="block 1 has no attention output projection"):
        explain.explain(lm, llama_trace, 0)


def test_trace_keeps_explanations_and_varentropy(tiny_llama, llama_trace):
    e = explain.explain(tiny_llama, llama_trace, 2, methods=("grad_x_input",))
    kept = llama_trace.model_copy(update={"explanations": [e]})
    back = trace_io.parse(trace_io.dumps(kept))
    assert back.explanations == [e]
    s = llama_trace.steps[2]
    ids = llama_trace.prompt_ids + [x.token_id for x in llama_trace.steps[:2]]
    with torch.inference_mode():
        logp = torch.log_softmax(tiny_llama.model(input_ids=torch.tensor([ids])).logits[0, -1].double(), -1)
    bits = -logp / torch.log(torch.tensor(2.0, dtype=torch.float64))
    p = logp.exp()
    var = float((p * bits**2).sum() - (p * bits).sum() ** 2)
    assert s.varentropy is not None and abs(s.varentropy - var) < 1e-3 * max(1.0, var)


def test_uncertainty_frame_and_charts(tiny_llama, llama_trace):
    frame = frames.uncertainty_frame(llama_trace)
    s = llama_trace.steps[0]
    row = frame.iloc[0]
    assert row["margin"] == pytest.approx(s.top_proc.probs[0] - s.top_proc.probs[1])
    assert row["surprisal"] == pytest.approx(-torch.log2(torch.tensor(s.p_raw)).item(), rel=1e-5)
    assert bool(row["torn"]) == (s.entropy_raw >= frames.TORN_ENTROPY and row["margin"] <= frames.TORN_MARGIN)
    assert charts.uncertainty_chart(frame, selected=1).to_dict()["vconcat"]
    e = explain.explain(tiny_llama, llama_trace, 1)
    comp = frames.components_frame(e)
    assert len(comp) == tiny_llama.n_layers * (tiny_llama.n_heads + 1)
    assert charts.components_chart(comp, "x").to_dict()["mark"]["type"] == "rect"
    attr = frames.attribution_frame(e)
    assert charts.attribution_chart(attr, top=5).to_dict()


def test_cli_writes_the_listed_fields(tiny_llama_dir, llama_trace, tmp_path, capsys):
    path = tracefile.save(llama_trace, None, tmp_path / "trace.json")
    out = tmp_path / "why.json"
    assert cli_main(["explain", str(path), "--step", "2", "--out", str(out), "--ig_steps", "8"]) == 0
    data = json.loads(out.read_text())
    for field in ("step", "target", "contrast", "logit_diff", "inputs", "components"):
        assert field in data
    assert set(data["inputs"]) >= {"positions", "labels", "methods"}
    assert set(data["components"]) >= {"embed", "heads", "mlps"}
    assert cli_main(["explain", str(path), "--step", "99"]) == 2
    assert "step 99 is out of range" in capsys.readouterr().err
    missing = llama_trace.model_copy(update={"model": llama_trace.model.model_copy(update={"name": "/nope/model"})})
    bad = tracefile.save(missing, None, tmp_path / "other.json")
    assert cli_main(["explain", str(bad), "--step", "0"]) == 2
    assert "/nope/model" in capsys.readouterr().err


def test_cli_explain_is_held_to_the_host_limits(llama_trace, tmp_path, capsys, monkeypatch):
    """The same caps as the app's Explain: refused before the model loads, the limit named."""
    path = tracefile.save(llama_trace, None, tmp_path / "trace.json")
    monkeypatch.setenv("EXPLORER_MAX_PROMPT_TOKENS", "2")
    assert cli_main(["explain", str(path), "--step", "0"]) == 2
    assert "EXPLORER_MAX_PROMPT_TOKENS" in capsys.readouterr().err


def test_app_explains_a_step_and_keeps_it(tiny_llama_dir):
    at = use_model(start(), tiny_llama_dir, max_new_tokens=6, min_new_tokens=6, seed=3)
    at.button(key="gen_generate").click().run()
    at.button(key="FormSubmitter:gen_explain_form-Explain").click().run()
    assert not at.exception, at.exception
    titles = chart_titles(at)
    assert "Top positions" in titles and "Uncertainty per step (red: torn)" in titles
    at.button(key="gen_explain_keep").click().run()
    assert not at.exception, at.exception
    trace, _ = at.session_state["gen_trace"]
    assert len(trace.explanations) == 1


@pytest.mark.slow
def test_default_model_breakdown(default_model):
    trace = _trace(default_model, "default", n=4, prompt="What is the capital of France?")
    for step in range(len(trace.steps)):
        e = explain.explain(default_model, trace, step, methods=("grad_x_input",))
        assert abs(e.logit_diff - _independent_diff(default_model, trace, step, e.target.id, e.contrast.id)) < 1e-3
        assert abs(_parts_sum(e.components) - e.logit_diff) < 1e-2
        assert e.components.bias == 0.0 and not any(e.components.attn_bias)  # llama: the three parts alone


@pytest.mark.slow
def test_default_model_ig_completeness(default_model):
    trace = _trace(default_model, "default", n=3, prompt="What is the capital of France?")
    e = explain.explain(default_model, trace, 2, methods=("integrated_gradients",))
    assert e.checks["integrated_gradients_completeness_error"] < 0.05
    assert e.inputs.ig_steps <= explain.IG_STEPS  # the gradient evaluations it spent to get there


def test_adaptive_integrated_gradients_refines_a_rough_path():
    """A steep step inside the path (tanh at alpha ~ 0.37) defeats a fixed grid of a few nodes; the
    adaptive rule halves the intervals around it until the scores add up to f(x) - f(base)."""
    x = torch.tensor([[[1.0, 2.0]]])
    base = torch.zeros_like(x)

    def f(e: torch.Tensor) -> torch.Tensor:
        return torch.tanh(200 * (e.sum((1, 2)) - 1.1))  # (B,); along the path e.sum = 3 alpha

    _, rough, spent = explain.integrated_gradients(f, x, base, n_steps=16)
    assert spent == 16 and rough > 0.05
    attr, err, spent = explain.integrated_gradients(f, x, base, n_steps=256)
    assert err < 0.05 and 16 < spent <= 256
    assert float(attr.sum()) == pytest.approx(float(f(x) - f(base)), rel=0.05)


def test_attn_lrp_conserves_where_no_softmax_is_on_the_way(tiny_llama_dir, llama_trace):
    """With attention silenced a bias-free Llama is norms (scale held), MLPs (identity and uniform rules) and
    the residual: AttnLRP's relevance must add up to the logit difference exactly there."""
    lm = models.load(str(tiny_llama_dir))
    _silence_attention(lm)
    e = explain.explain(lm, llama_trace, 3, methods=("attn_lrp",))
    assert abs(e.checks["attn_lrp_sum"] - e.logit_diff) < 1e-4 * max(1.0, abs(e.logit_diff))


def test_attn_lrp_rules_leave_the_forward_and_other_gradients_alone(tiny_llama, llama_trace):
    from explorer_core import capture, lrp

    ids = torch.tensor([llama_trace.prompt_ids])
    f = explain.logit_diff_fn(tiny_llama.model, 5, 7)
    x = tiny_llama.model.get_input_embeddings()(ids).detach().requires_grad_(True)
    capture.install(tiny_llama.model)
    (plain,) = torch.autograd.grad(f(x).sum(), x)
    with lrp.rules(tiny_llama.model):
        with torch.no_grad():
            assert float(f(x)) == pytest.approx(float(f(x.detach())), abs=1e-5)
        (ruled,) = torch.autograd.grad(f(x).sum(), x)
    (after,) = torch.autograd.grad(f(x).sum(), x)
    assert not torch.allclose(ruled, plain)  # the rules change the gradient…
    assert torch.equal(after, plain) and not lrp.active()  # …only inside the block: hooks are gone after


def test_cli_methods_flag(llama_trace, tmp_path):
    path = tracefile.save(llama_trace, None, tmp_path / "trace.json")
    out = tmp_path / "why.json"
    assert cli_main(["explain", str(path), "--step", "1", "--methods", "attn_lrp", "--out", str(out)]) == 0
    assert list(json.loads(out.read_text())["inputs"]["methods"]) == ["attn_lrp"]
    assert cli_main(["explain", str(path), "--step", "1", "--methods", "saliency"]) == 2


def test_score_stream_shows_hostile_labels_as_text():
    """Token labels reach st.html only as escaped text, in the span and in its tooltip."""
    from explorer_ui.explain_view import score_stream_html

    html_out = score_stream_html(['<img src=x onerror="alert(1)">', "a'b"], [0.5, -0.2])
    assert "<img" not in html_out and 'onerror="' not in html_out and "a'b" not in html_out
    assert html_out.count("<span ") == 2


def test_lrp_rules_follow_a_recomputation_to_another_thread(tiny_llama):
    """On CUDA autograd recomputes checkpointed blocks on its own thread; here a backward run from another
    thread forces that on the CPU: the gradient must be the one with the rules on, not plain autograd's."""
    import threading

    from explorer_core import capture, lrp
    from explorer_core.explain import find_parts, logit_diff_fn, recomputed_blocks

    model = tiny_llama.model
    capture.install(model)
    ids = torch.tensor([tiny_llama.tokenizer("Why is the sea salty? Cats and dogs.")["input_ids"]])
    embeds = model.get_input_embeddings()(ids).float().detach()
    f = logit_diff_fn(model, 5, 7)

    def gradient(rules: bool, elsewhere: bool) -> torch.Tensor:
        x = embeds.clone().requires_grad_(True)
        ctx = lrp.rules(model) if rules else contextlib.nullcontext()
        with recomputed_blocks(find_parts(model).blocks), ctx, torch.enable_grad():
            y = f(x).sum()
            if not elsewhere:
                return torch.autograd.grad(y, x)[0]
            box = {}
            worker = threading.Thread(target=lambda: box.update(g=torch.autograd.grad(y, x)[0]))
            worker.start()
            worker.join()
            return box["g"]

    here, there, plain = gradient(True, False), gradient(True, True), gradient(False, False)
    assert torch.equal(here, there)
    assert not torch.allclose(here, plain, atol=1e-6)  # the rules do change the gradient on this model

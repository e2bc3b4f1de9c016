"""The cost of watching: explorer loop vs model.generate, with and without attention capture."""

from __future__ import annotations

import torch

from explorer_core.config import GenerationConfig
from explorer_core.models import LoadedModel
from explorer_core.stepper import Run

from .common import interleave, timed

RATIO_HEAD = "| what | min | median | max | ratio to generate |\n|---|---|---|---|---|"

FLAGS = dict(temperature=0.8, top_k=50, top_p=0.95, repetition_penalty=1.1)


def contenders(lm: LoadedModel, n: int, attn_every: int = 10) -> dict:
    cfg = GenerationConfig(max_new_tokens=n, min_new_tokens=n, block_eos_steps=n, clean_stop=False, **FLAGS)
    probe = Run(lm, cfg)
    prompt = probe.ids[:, : probe.prompt_len]

    def hf_generate():
        torch.manual_seed(cfg.seed)
        with torch.inference_mode():
            out = lm.model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=True,
                min_new_tokens=n,
                max_new_tokens=n,
                **FLAGS,
            )
        assert out.shape[1] == prompt.shape[1] + n

    def explorer(capture: bool):
        def go():
            run = Run(lm, cfg.replace(capture_attention=capture))
            for _ in run:
                pass
            assert run.n == n

        return go

    def seed_way():
        # the original tool's way to get attention: a full eager forward over the whole sequence every attn_every steps
        run = Run(lm, cfg.replace(capture_attention=False))
        before = lm.model.config._attn_implementation
        with torch.inference_mode():
            for step in run:
                if step.step % attn_every == 0:
                    lm.model.set_attn_implementation("eager")
                    lm.model(run.ids[:, : run.prompt_len + run.n], output_attentions=True)
                    lm.model.set_attn_implementation(before)

    return {
        "model.generate": lambda: n / timed(hf_generate),
        "explorer, top-k logging": lambda: n / timed(explorer(False)),
        "explorer, top-k + every layer's and head's attention row": lambda: n / timed(explorer(True)),
        f"explorer + full re-forward every {attn_every} steps, eager (the original tool's way)": lambda: (
            n / timed(seed_way)
        ),
    }


def run(lm: LoadedModel, lengths=(128, 256, 512)) -> tuple[str, dict]:
    lines, figures = [], {}
    for n in lengths:
        series = interleave(contenders(lm, n))
        base = series["model.generate"].median
        lines += [
            f"\n**{n} new tokens** (tokens/s, higher is better; ratio = median / median of model.generate)\n",
            RATIO_HEAD,
        ]
        for s in series.values():
            lines.append(
                f"| {s.name} | {min(s.values):.2f} | {s.median:.2f} | {max(s.values):.2f} | {s.median / base:.3f} |"
            )
            figures[(n, s.name)] = s.median / base
    return "\n".join(lines), figures


def lens_cost(lm: LoadedModel, lengths=(128, 256, 512)) -> str:
    """Tokens/s with and without the logit lens (every layer projected through the head every step)."""
    lines = []
    for n in lengths:
        cfg = GenerationConfig(
            max_new_tokens=n, min_new_tokens=n, block_eos_steps=n, clean_stop=False, capture_attention=False, **FLAGS
        )

        def go(lens: bool, cfg=cfg, n=n):
            def once():
                run = Run(lm, cfg.replace(logit_lens=lens))
                for _ in run:
                    pass

            return lambda: n / timed(once)

        series = interleave({"explorer, top-k logging": go(False), "explorer + logit lens": go(True)})
        base = series["explorer, top-k logging"].median
        lines += [
            f"\n**Logit lens, {n} new tokens** (tokens/s; ratio to the loop without it)\n",
            RATIO_HEAD.replace("generate", "no lens"),
        ]
        for s in series.values():
            lines.append(
                f"| {s.name} | {min(s.values):.2f} | {s.median:.2f} | {max(s.values):.2f} | {s.median / base:.3f} |"
            )
    return "\n".join(lines)

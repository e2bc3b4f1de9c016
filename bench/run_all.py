"""Run every benchmark once and write BENCHMARKS.md (figures from this run only).

    python -m bench.run_all                     # every section (about an hour on 2 cores)
    python -m bench.run_all --only processes    # one group; the file's other sections stay as they are

Sections measured by their own scripts (`bench.explain`, `bench.capture`) are kept when the file is
regenerated: they take longer than the rest together.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from explorer_core import models
from tools import mdsections

from . import growth, longctx, overhead, processes, tracefile
from .common import TABLE_HEAD, machine

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "BENCHMARKS.md"
PNG = ROOT / "docs" / "bench_growth.png"
HAND_RUN = (
    "8. Explaining one step",
    "9. Reading attention rows",
    "10. The fidelity check",
    "11. Interventions",
)  # heading prefixes of separately run sections
GROUPS = ("trace", "overhead", "growth", "long", "processes", "gpu")


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=GROUPS, help="run these groups and replace only their sections")
    args = p.parse_args(argv)
    old = OUT.read_text(encoding="utf-8") if OUT.exists() else ""
    header = (
        f"# Benchmarks\n\nOne run of `make bench`. {machine()}. Default model: SmolLM2-135M-Instruct, "
        "float32 on CPU, sdpa attention (recorded rows come from the capture function). Contenders are interleaved "
        "(A B C D, A B C D, ...) in one process; min / median / max over the rounds.\n"
    )
    text = old if args.only else keep_hand_run(header, old)

    def add(section: str) -> None:  # written after every section: a late failure keeps the earlier figures
        nonlocal text
        for heading, body in mdsections.split(section):
            if heading:
                if args.only:  # the file's header names another run: this section names its own
                    first, rest = body.split("\n", 1)
                    body = f"{first}\n\nRun on its own (`--only`): {machine()}.\n{rest}"
                text = mdsections.replace(text, heading, body)
        OUT.write_text(text, encoding="utf-8")

    for group in args.only or GROUPS:
        log(group)
        for section in SECTIONS[group]():
            add(section)
    log(f"wrote {OUT}")


def keep_hand_run(text: str, old: str) -> str:
    """`text` with the separately measured sections of the old file appended."""
    for heading, body in mdsections.split(old):
        if heading.startswith(HAND_RUN):
            text = mdsections.replace(text, heading, body)
    return text


_LM = []


def lm():
    """The default model, loaded once for the groups that share it."""
    if not _LM:
        _LM.append(models.load())
    return _LM[0]


def overhead_sections() -> list[str]:
    text, ratios = overhead.run(lm())
    return ["## 1–2. The cost of watching\n" + text + "\n" + targets_overhead(ratios) + "\n" + overhead.lens_cost(lm())]


def growth_sections() -> list[str]:
    PNG.parent.mkdir(exist_ok=True)
    text, _ = growth.run(lm(), png=PNG)
    return [
        "## 3. Growth with position (1024 new tokens, full attention)\n\n" + text + f"\n\n![growth](docs/{PNG.name})\n"
    ]


def gpu_section() -> str:
    return (
        "## 7. GPU\n\nNo GPU machine was lent to the session that produced this run, so the GPU rows "
        "(1B Llama-shaped model, bfloat16, 512 new tokens, prompts of 128, 512 and 2,000 tokens: "
        "model.generate with sdpa against the explorer with capture off and on) are open. "
        "`python -m bench.gpu` measures them on a CUDA machine and prints the tables.\n"
    )


def long_prompt_section() -> str:
    text, rows = longctx.run()
    on = {r["size"]: r for r in rows if r["capture"]}
    off = {r["size"]: r for r in rows if not r["capture"]}
    ratio = {t: on[t]["generate_s"] / off[t]["generate_s"] for t in on}
    checks = [
        (f"generate with attention ≤ 1.3 × without at 1,000 tokens: {ratio[1000]:.2f}", ratio[1000] <= 1.3),
        (f"… ≤ 1.5 × at 4,000 tokens: {ratio[4000]:.2f}", ratio[4000] <= 1.5),
        (
            f"peak RSS ≤ 2.5 GB at 4,000 tokens (CLI path): {on[4000]['peak_rss_mb']:.0f} MB",
            on[4000]["peak_rss_mb"] <= 2560,
        ),
        (
            f"viewer first screen ≤ 5 s at 4,000 tokens: {on[4000]['first_screen_s']:.1f} s",
            on[4000]["first_screen_s"] <= 5,
        ),
        (f"layer/head heatmap ≤ 2 s at 4,000 tokens: {on[4000]['layer_head_s']:.1f} s", on[4000]["layer_head_s"] <= 2),
        (f"viewer RSS ≤ 2.5 GB: {on[4000]['viewer_peak_rss_mb']:.0f} MB", on[4000]["viewer_peak_rss_mb"] <= 2560),
    ]
    lines = [f"- {text_} — {verdict(ok)}" for text_, ok in checks]
    return (
        "## Long prompts\n\n128 new tokens, `--chat false`, English text; each row is one child process "
        "(load excluded; peak RSS includes the loaded model). The viewer columns are the Trace viewer "
        "page (AppTest, server side) on the saved run.\n\n" + text + "\n\n" + "\n".join(lines) + "\n"
    )


def targets_overhead(ratios: dict) -> str:
    lengths = sorted({n for n, _ in ratios})
    lines = [
        "\n| target | " + " | ".join(f"{n} tokens" for n in lengths) + " | verdict |",
        "|---|" + "---|" * len(lengths) + "---|",
    ]
    for name, goal in (
        ("explorer, top-k logging", 0.97),
        ("explorer, top-k + every layer's and head's attention row", 0.95),
    ):
        got = [ratios[(n, name)] for n in lengths]
        cells = " | ".join(f"{r:.3f}" for r in got)
        lines.append(f"| {name} ≥ {goal} × generate | {cells} | {verdict(min(got) >= goal)} |")
    return "\n".join(lines) + "\n"


def trace_section(lm) -> str:
    sizes, io_series = tracefile.size_and_io(lm)
    comp = sizes["companion (.attn.safetensors)"]
    total_mb = (sizes["trace.json"] + comp) / 1e6
    render = tracefile.viewer_render(lm)
    lines = [
        "## 4. Trace files\n",
        f"256 new tokens, full attention, {sizes['prompt tokens']} prompt tokens: trace.json "
        f"{sizes['trace.json'] / 1e6:.2f} MB + companion {comp / 1e6:.2f} MB (uncompressed float16) = "
        f"**{total_mb:.2f} MB** (target ≤ 20 MB: {verdict(total_mb <= 20)}).\n",
        TABLE_HEAD,
    ]
    lines += [s.row("s", "{:.3f}") for s in io_series + render]
    worst = min(s.median for s in render)
    lines.append(f"\nViewer render of a 512-step trace, median: {worst:.2f} s (target ≤ 2 s: {verdict(worst <= 2)}).\n")
    return "\n".join(lines)


def process_section() -> str:
    cli = processes.cli(512)
    app = processes.app(512)
    start = processes.startup()
    ratio = app["tps"] / cli["tps"]
    return "\n".join(
        [
            "## 5. Memory and the app against the CLI (512 new tokens, full attention)\n",
            "| what | figure | target | verdict |",
            "|---|---|---|---|",
            f"| CLI peak RSS | {cli['rss_mb']:.0f} MB | ≤ 1536 MB | {verdict(cli['rss_mb'] <= 1536)} |",
            f"| app (streamlit server) peak RSS | {app['rss_mb']:.0f} MB | ≤ 1536 MB (Cloud: 2.7 GB) | {verdict(app['rss_mb'] <= 1536)} |",
            f"| CLI wall-clock tokens/s | {cli['tps']:.1f} | | |",
            f"| app wall-clock tokens/s, live display included ({app['tokens']} tokens) | {app['tps']:.1f} | ≥ 0.8 × CLI | "
            f"{ratio:.2f} × CLI: {verdict(ratio >= 0.8)} |",
            "\n## 6. Start-up\n",
            "| what | seconds |",
            "|---|---|",
            f"| first-ever load of the default model (GGUF → safetensors conversion, new process) | {start['first_s']:.1f} |",
            f"| cached load (new process, imports included) | {start['cached_s']:.1f} |",
            f"| app: click Generate on a fresh server → first token on screen (model load included) | {app['ttft_s']:.1f} |",
            "",
        ]
    )


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


SECTIONS = {
    "trace": lambda: [trace_section(lm())],
    "overhead": overhead_sections,
    "growth": growth_sections,
    "long": lambda: [long_prompt_section()],
    "processes": lambda: [process_section()],
    "gpu": lambda: [gpu_section()],
}


if __name__ == "__main__":
    main()

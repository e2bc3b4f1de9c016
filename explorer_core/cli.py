"""Command line: `python -m explorer_core --prompt ... --out_dir runs/x` generates and writes artifacts.

Flags are generated from GenerationConfig, spelled as the original tool spelled them (--max_new_tokens ...).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import logging
import sys
from pathlib import Path

from .config import GenerationConfig, field_specs


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a yes/no value: use true or false")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m explorer_core",
        description="Generate with a small language model and record what it considered "
        "and what it attended to, step by step. "
        "`python -m explorer_core replay trace.json` re-checks a saved trace; "
        "`python -m explorer_core explain trace.json --step N` says why step N chose its token; "
        "`python -m explorer_core intervene trace.json --step N --ablate 29.3` measures what changing "
        "one part does there.",
    )
    for f in field_specs():
        kind = {"int": int, "float": float, "str": str, "bool": _bool}[f.type]
        meta = f.metadata
        rng = f" [{meta['min']}..{meta['max']}]" if meta.get("min") is not None else ""
        help_text = f"{meta['help']}{rng} (default: {f.default!r})"
        if f.type == "bool":
            p.add_argument(
                f"--{f.name}", type=_bool, nargs="?", const=True, default=f.default, metavar="BOOL", help=help_text
            )
        else:
            p.add_argument(f"--{f.name}", type=kind, default=f.default, choices=meta.get("choices"), help=help_text)
    p.add_argument(
        "--prompt_file",
        default=None,
        metavar="PATH",
        help="Read the prompt from a UTF-8 text file ('-' reads standard input); overrides --prompt.",
    )
    p.add_argument("--out_dir", default="runs/latest", help="Folder for trace.json, output.txt and PNGs.")
    p.add_argument("--no_png", action="store_true", help="Skip the PNG charts (faster).")
    p.add_argument("--html", action="store_true", help="Also write trace.html, one self-contained page to share.")
    p.add_argument(
        "--no_companion",
        action="store_true",
        help="Write trace.json only: keep the attention snapshots inside it, skip the full attention file.",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="No progress bar or token stream.")
    return p


def replay_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m explorer_core replay",
        description="Re-score a saved trace's tokens with the model and report the largest "
        "difference between recorded and recomputed probabilities.",
    )
    p.add_argument("trace", help="Path to trace.json.")
    p.add_argument("--model", default=None, help="Model to replay with (default: the one named in the trace).")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    return p


def _read_prompt(path: str) -> str:
    """The prompt from a file or standard input, with a message naming the file when it cannot be read."""
    try:
        if path == "-":
            return sys.stdin.read()
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the prompt from {path}: {getattr(exc, 'strerror', None) or exc}") from None


def explain_main(argv: list[str], command: str = "explain") -> int:
    """`explain` (or `intervene`), with --out checked before any model work, and the result printed if
    writing it still fails."""
    if command == "intervene":
        from .intervene import cli_main
    else:
        from .explain import cli_main

    pre = argparse.ArgumentParser(prog=f"python -m explorer_core {command}", add_help=False)
    pre.add_argument("--out", default=None)
    known, rest = pre.parse_known_args(argv)
    if known.out is None:
        return cli_main(argv)
    out = Path(known.out)
    problem = "is a folder: give a file name" if out.is_dir() else _unwritable(out)
    if problem:
        print(f"error: --out {known.out} {problem}", file=sys.stderr)
        return 2
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):  # the JSON it prints without --out
            code = cli_main(rest)
    except BaseException:
        sys.stdout.write(printed.getvalue())  # --help, a usage error or Ctrl-C: what it printed still shows
        raise
    text = printed.getvalue()
    if code != 0:
        sys.stdout.write(text)
        return code
    from .tracefile import _atomic_write

    try:
        _atomic_write(out, text.encode("utf-8"))
    except OSError as exc:
        sys.stdout.write(text)
        print(f"error: could not write {out}: {exc.strerror or exc}; the result is printed above", file=sys.stderr)
        return 1
    return 0


def _unwritable(out: Path) -> str | None:
    """Why a file cannot be written at `out`, tried in its folder (no model work is done for nothing)."""
    from .artifacts import writable_problem

    if not out.parent.exists():
        return f"is in {out.parent}, which does not exist: create the folder first"
    problem = writable_problem(out.parent)
    return f"cannot be written: its folder {out.parent} {problem}" if problem else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["replay"]:
        from .runner import run_replay

        args = replay_parser().parse_args(argv[1:])
        return run_replay(args.trace, args.model, args.dtype, args.device)
    if argv[:1] in (["explain"], ["intervene"]):
        return explain_main(argv[1:], argv[0])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(GenerationConfig)}
    try:
        if args.prompt_file is not None:
            values["prompt"] = _read_prompt(args.prompt_file)
        config = GenerationConfig(**values)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from .runner import run_cli  # heavy imports (torch, transformers) only once the flags are valid

    return run_cli(
        config, args.out_dir, pngs=not args.no_png, quiet=args.quiet, companion=not args.no_companion, html=args.html
    )

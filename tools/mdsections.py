"""Sections of a markdown file by their `## ` heading: read one, replace one, keep the rest.

RELIABILITY.md mixes sections that `tools.reliability_report` regenerates in seconds with sections
that take minutes to measure (`tools.hosted_walkthrough`, `bench.attnmem`); each tool writes its own
section through here and the report keeps the others as they are.
"""

from __future__ import annotations

from pathlib import Path


def split(text: str) -> list[tuple[str, str]]:
    """(heading, text) per `## ` section in order; the part before the first one has heading ""."""
    out: list[tuple[str, str]] = [("", "")]
    for line in text.splitlines(keepends=True):
        if line.startswith("## "):
            out.append((line[3:].strip(), ""))
        out[-1] = (out[-1][0], out[-1][1] + line)
    return out


def get(text: str, heading: str) -> str | None:
    """The whole section (its heading line included), or None."""
    return next((body for h, body in split(text) if h == heading), None)


def replace(text: str, heading: str, section: str) -> str:
    """`text` with the section `heading` replaced by `section` (which starts with its heading line), or
    with `section` appended when there is none; sections end up one blank line apart."""
    parts = split(text)
    if not any(h == heading for h, _ in parts):
        parts.append((heading, section))
    bodies = [section if h == heading else body for h, body in parts]
    return "\n\n".join(b.strip("\n") for b in bodies if b.strip()) + "\n"


def write(path: Path, heading: str, section: str) -> None:
    """Put `section` into the file at `path` in place of its old version (the file is made if missing)."""
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    path.write_text(replace(old, heading, section), encoding="utf-8")

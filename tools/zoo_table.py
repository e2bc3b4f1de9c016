"""Write the README's table of architectures from the zoo's own checks (tests/zoo_check.py).

python -m tools.zoo_table           # print the table
python -m tools.zoo_table --write   # replace the README section "Architectures"
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from tests import zoo, zoo_check
from tools import mdsections

README = Path(__file__).resolve().parent.parent / "README.md"
INTRO = (
    "Every number the tool shows is the model's own, or the feature is refused with the reason. Tiny random "
    "models of each class below (windows of 32 against an 88-token prompt and 16 new tokens, so every window "
    "is passed) are checked by `tests/test_zoo.py` against transformers' own references: tokens greedy and "
    "sampled against `generate()`, every recorded row and prompt cell of every layer and head against eager "
    "`output_attentions`, the last layer's lens against the model's probability, the breakdown's sum against "
    "the logit difference, a middle layer's head and MLP zeroed at a step ('What if?') against plain forward "
    "hooks and the last MLP zeroed against the breakdown's prediction, and a branch from the live run against "
    "the same branch prefilled. Figures in "
    "brackets are the largest difference measured. The same checks run on any model you load (the "
    "fidelity check: a short probe longer than every window, up to 512 tokens), and the app shows their "
    "figures under the run's summary (below, the default model). Table written by `python -m tools.zoo_table --write`."
)


def _cell(text: str) -> str:
    text = text.replace("|", "/").replace("\n", " ")
    return text if len(text) <= 160 else text[:157] + "..."


def table() -> str:
    lines = [
        "| architecture | class | attention runs as | tokens | attention rows | logit lens | explain | what if | live branch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in zoo.NAMES:
        try:
            row = zoo_check.check(name, window=zoo.SPECS[name].window)
        except AssertionError as exc:  # the test fails on this too; the table says so rather than hiding it
            row = {"class": "?", "implementation": "?", "tokens": f"FAILS: {exc}"}
        keys = ("class", "implementation", "tokens", "attention", "lens", "explain", "what_if")
        cells = [row.get(k, "") for k in keys]
        lines.append(f"| {name} | " + " | ".join(_cell(c) for c in cells) + f" | {_cell(row.get('branch', ''))} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="replace the README's Architectures table")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    start = time.perf_counter()
    body = table()
    took = time.perf_counter() - start
    print(body)
    print(f"\n{len(zoo.NAMES)} architectures in {took:.0f} s")
    if args.write:
        shot = "![The fidelity check under a run's summary](docs/fidelity.png)"
        mdsections.write(README, "Architectures", f"## Architectures\n\n{INTRO}\n\n{shot}\n\n{body}\n")


if __name__ == "__main__":
    main()

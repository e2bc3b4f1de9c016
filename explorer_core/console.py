"""The `explorer` command: `explorer app` starts the dashboard; every other command is `python -m explorer_core`.

The app's files (app.py and its pages) sit beside this package in a clone, or inside the installed
`explorer_app` package. Starting it runs `streamlit run` in a child process, so this package itself
never imports streamlit.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path

USAGE = """usage: explorer <command> [options]

Watch a small language model generate, one token at a time.

commands:
  app       start the dashboard in the browser; options after it go to `streamlit run`
            (e.g. explorer app --server.port 8600)
  run       generate and write trace.json, output.txt and PNG charts (explorer run --help lists the flags;
            `explorer --prompt ...` without a command does the same)
  replay    re-score a saved trace's tokens with the model (explorer replay --help)
  explain   why one step chose its token: components and input attributions (explorer explain --help)
  intervene what if one part had been different at a step: measured effect beside the prediction
            (explorer intervene --help)

Any other command goes to `python -m explorer_core` as it is, so its commands all work here too.
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] == "app":
        return run_app(argv[1:])
    if argv[0] == "run":
        argv = argv[1:]
    from .cli import main as cli_main

    return cli_main(argv)


def app_path() -> Path:
    """app.py of the dashboard: beside this package in a clone, else in the installed explorer_app package."""
    root = Path(__file__).resolve().parents[1]
    if (root / "app.py").is_file() and (root / "pyproject.toml").is_file():  # a clone, installed or not
        return root / "app.py"
    spec = importlib.util.find_spec("explorer_app")
    places = list(spec.submodule_search_locations or []) if spec is not None else []
    for place in places:
        if (Path(place) / "app.py").is_file():
            return Path(place) / "app.py"
    raise FileNotFoundError(
        "the dashboard's app.py was not found beside explorer_core nor in an installed explorer_app package: "
        "reinstall with `pip install .` from the repository, or run `streamlit run app.py` in a clone"
    )


def config_flags(app: Path, env: Mapping[str, str] | None = None) -> list[str]:
    """The app's .streamlit/config.toml as `streamlit run` flags, so they apply from any working folder.

    A setting also given as a STREAMLIT_<SECTION>_<KEY> environment variable is left out: Streamlit ranks
    flags above the environment, and the variable is how the README says to change, e.g., the upload cap.
    """
    env = os.environ if env is None else env
    path = app.parent / ".streamlit" / "config.toml"
    if not path.is_file():
        return []
    settings = tomllib.loads(path.read_text(encoding="utf-8"))
    return [
        f"--{section}.{key}={str(value).lower() if isinstance(value, bool) else value}"
        for section, table in settings.items()
        for key, value in table.items()
        if f"STREAMLIT_{section}_{_snake(key)}".upper() not in env
    ]


def _snake(key: str) -> str:
    """maxUploadSize -> max_upload_size (Streamlit's environment variable names)."""
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in key)


def run_app(options: list[str]) -> int:
    try:
        app = app_path()
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    command = [sys.executable, "-m", "streamlit", "run", str(app), *config_flags(app), *options]
    child = subprocess.Popen(command)
    # Ctrl-C reaches the child by itself (same process group); a plain `kill` of this process is passed on.
    signal.signal(signal.SIGTERM, lambda *_: child.terminate())
    while True:
        try:
            return child.wait()
        except KeyboardInterrupt:  # wait for the child to shut down cleanly
            continue

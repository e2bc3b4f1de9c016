"""Model Interpret Explorer core: cached stepwise generation, faithful per-step logging, traces and charts.

Pure Python: nothing here imports streamlit. The app and the CLI render what this package produces.
"""

from .version import __version__  # noqa: F401 - the public name


def __getattr__(name: str):
    """`explorer_core.watch`, `explorer_core.Trace` and `explorer_core.default_model`, imported on first use
    (torch loads only then)."""
    if name == "watch":
        from .notebook import watch

        return watch
    if name == "default_model":
        from .models import default_model

        return default_model
    if name == "Trace":
        from .notebook import Trace

        return Trace
    raise AttributeError(f"module 'explorer_core' has no attribute {name!r}")

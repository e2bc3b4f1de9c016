"""Model Interpret Explorer core: cached stepwise generation, faithful per-step logging, traces and charts.

Pure Python: nothing here imports streamlit. The app and the CLI render what this package produces.
"""

__version__ = "0.1.0"

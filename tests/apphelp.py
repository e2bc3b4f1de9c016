"""Helpers for AppTest: start the app, point it at a model, read chart specs and their data."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from streamlit.dataframe_util import convert_arrow_bytes_to_pandas_df
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]
OTHER = "Other (type a hub id or folder)"


def start(timeout: float = 120) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=timeout)
    at.run()
    assert not at.exception, at.exception
    return at


def use_model(at: AppTest, folder, **settings) -> AppTest:
    at.selectbox(key="sidebar_model_choice").set_value(OTHER).run()
    at.text_input(key="sidebar_model_custom").input(str(folder)).run()
    for name, value in settings.items():
        at.get_by_key(f"sidebar_{name}").set_value(value)
    at.run()
    assert not at.exception, at.exception
    return at


def charts(at: AppTest) -> list[tuple[dict, list[pd.DataFrame]]]:
    """Every Vega-Lite chart on screen: its spec and the data frames Streamlit sent with it."""
    out = []
    for el in at.get("vega_lite_chart"):
        spec = json.loads(el.proto.spec)
        data = [convert_arrow_bytes_to_pandas_df(d.data.data) for d in el.proto.datasets]
        out.append((spec, data))
    return out


def chart_titles(at: AppTest) -> list[str]:
    titles = []
    for spec, _ in charts(at):
        t = spec.get("title")
        t = t if isinstance(t, (str, list)) else (t or {}).get("text", "")
        titles.append(" ".join(t) if isinstance(t, list) else t)
    return titles

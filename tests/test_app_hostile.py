"""Hostile but small inputs against the app: model names no path can hold, Markdown in file strings, limits
reached, long-running explanations, links and pipes among saved runs, temporary folders left behind.

Every input file is built here; the app is driven through AppTest."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
import time

import pytest

from explorer_core import admission
from explorer_core import trace as trace_io
from explorer_core.trace import Branch, Components, Explanation, InputScores, TokenRef, TraceError
from explorer_ui import branching, explain_view, loading, tempfiles
from tests import crafted
from tests.apphelp import chart_titles, start

PAYLOAD = "![x](http://127.0.0.1:9/beacon.png) [link](http://x)"
BRANCH_SUBMIT = "FormSubmitter:viewer_trace_branch_form-Continue from here"
EXPLAIN_SUBMIT = "FormSubmitter:viewer_explain_form-Explain"
# elements whose text is shown as is (never Markdown): the payload may appear there verbatim
PLAIN = {"text", "code", "arrow_data_frame", "dataframe", "vega_lite_chart", "selectbox", "text_input", "file_uploader"}


def _trace(model: str = "crafted", prompt_len: int = 3, steps: int = 2, **update):
    tr = crafted.trace(prompt_len, steps)
    config = {**tr.config, "model": model}
    return tr.model_copy(
        update={"model": tr.model.model_copy(update={"name": model}), "config": config, "attention": None, **update}
    )


def _explanation(tr, method: str = "integrated_gradients", baseline: str = "zeros", diff: float = 1.0):
    n = tr.prompt_len
    return Explanation(
        step=0,
        target=TokenRef(id=1, label="a"),
        contrast=TokenRef(id=2, label="b"),
        logit_diff=diff,
        inputs=InputScores(
            positions=list(range(n)),
            labels=["x"] * n,
            methods={"integrated_gradients": [0.1] * n, method: [0.2] * n},
            baseline=baseline,
            ig_steps=4,
        ),
        components=Components(embed=0.5, heads=[[0.25]], mlps=[0.25], attn_bias=[0.0], bias=0.0),
        checks={
            "sum_of_parts": diff,
            "integrated_gradients_completeness_error": 0.01,
            f"{method}_completeness_error": 0.5,
        },
        timing_s={"components": 0.1},
    )


def _viewer(files) -> object:
    at = start()
    at.switch_page("pages/viewer.py").run()
    at.radio(key="viewer_source").set_value("Upload").run()
    at.file_uploader(key="viewer_upload").set_value(files).run()
    assert not at.exception, at.exception
    return at


def _upload(tr, name: str = "trace.json"):
    return _viewer([(name, trace_io.dumps(tr).encode("utf-8"), "application/json")])


def _nodes(node):
    yield node
    for child in getattr(node, "children", {}).values():
        yield from _nodes(child)


def _texts(at) -> list[str]:
    return [t.value for t in at.text]


# -- 1. a model name no path can hold: one sentence, the rest of the page drawn ------------------------


@pytest.mark.parametrize("name", ["~nosuchuser/x", "m" * 300])
def test_unloadable_model_name_gives_one_sentence_everywhere(name):
    at = _upload(_trace(model=name))
    assert "Top candidates: raw model" in chart_titles(
        at
    )  # the viewer drew the trace (it asks whether its model is loaded)
    for action in ("viewer_replay", EXPLAIN_SUBMIT, BRANCH_SUBMIT):  # each loads the trace's model
        at.button(key=action).click().run()
        assert not at.exception, at.exception
        said = [t for t in _texts(at) if "neither a folder nor a hub id" in t]
        assert len(said) == 1, (action, _texts(at))
        assert name[:40] in said[0] and len(said[0]) < 400  # the name, cut short, and the fix
        assert "Top candidates: raw model" in chart_titles(at)  # the rest of the page is still drawn
    assert at.session_state["viewer_trace"][0].model.name == name  # the trace is still the one shown
    assert "Top candidates: raw model" in chart_titles(at)


def test_unloadable_model_name_in_the_sidebar_is_said_not_raised():
    at = start()
    at.selectbox(key="sidebar_model_choice").set_value("Other (type a hub id or folder)").run()
    at.text_input(key="sidebar_model_custom").input("~nosuchuser/x").run()
    at.button(key="gen_generate").click().run()
    assert not at.exception, at.exception
    assert any("'~nosuchuser/x' is neither a folder nor a hub id" in t for t in _texts(at))


def test_a_failing_view_takes_only_its_own_section(monkeypatch):
    from explorer_ui import insight

    def broken(*_args, **_kwargs):
        raise RuntimeError("lens exploded")

    monkeypatch.setattr(insight, "render_lens", broken)
    at = _upload(_trace())
    assert any(e.value.startswith("Logit lens: this view could not be drawn") for e in at.error)
    assert "RuntimeError: lens exploded" in _texts(at)
    titles = chart_titles(at)
    assert "Top candidates: raw model" in titles and any("ncertainty" in t or "entropy" in t.lower() for t in titles)
    assert any(b.key == "viewer_dl_json" for b in at.get("download_button"))  # sections after it are drawn


# -- 2. strings from files are never Markdown ----------------------------------------------------------


def test_markdown_in_a_kept_explanation_and_a_file_name_stays_text():
    tr = _trace()
    tr = tr.model_copy(update={"explanations": [_explanation(tr, method=PAYLOAD, baseline=PAYLOAD)]})
    at = _viewer(
        [
            ("trace.json", trace_io.dumps(tr).encode("utf-8"), "application/json"),
            (PAYLOAD + ".png", b"not a trace", "image/png"),
        ]
    )
    shown = " ".join(str(n.proto) for n in _nodes(at._tree) if getattr(n, "proto", None) is not None)
    assert "127.0.0.1:9" in shown.replace("&#58;", ":")  # the strings are there (escaped), so the check bites
    for node in _nodes(at._tree):
        if getattr(node, "proto", None) is None or node.type in PLAIN:
            continue
        raw = str(node.proto)
        assert "](http" not in raw and "![x]" not in raw, (node.type, raw[:300])
    assert any("Left out" in w.value and "&#33;&#91;x&#93;" in w.value for w in at.warning)
    radio = at.radio(key="viewer_explain_method")
    assert all("](" not in o for o in radio.options)  # radio labels are Markdown


# -- 3. limits checked before acting ------------------------------------------------------------------


def test_the_65th_explanation_is_refused_before_keeping():
    tr = _trace()
    kept = [_explanation(tr, diff=1.0 + i / 100) for i in range(64)]
    tr = tr.model_copy(update={"explanations": kept})
    at = _upload(tr)
    loaded = at.session_state["viewer_trace"][0]
    made = _explanation(tr, diff=9.0)
    at.session_state[explain_view.RESULTS] = {(explain_view._trace_id(loaded), 0, 0): made}
    at.run()
    keep = at.button(key="viewer_explain_keep")
    assert keep.disabled
    assert any("already keeps 64 explanations" in c.value for c in at.caption)
    assert len(at.session_state["viewer_trace"][0].explanations) == 64
    trace_io.Trace.model_validate(at.session_state["viewer_trace"][0].model_dump())  # still valid


def test_an_explanation_that_would_take_the_trace_past_the_cap_is_refused(monkeypatch):
    tr = _trace()
    at = _upload(tr)
    loaded = at.session_state["viewer_trace"][0]
    made = _explanation(tr, diff=9.0)
    monkeypatch.setattr(trace_io, "MAX_TRACE_BYTES", len(loaded.model_dump_json()) + len(made.model_dump_json()))
    monkeypatch.setattr(admission, "MAX_TRACE_BYTES", trace_io.MAX_TRACE_BYTES)
    at.session_state[explain_view.RESULTS] = {(explain_view._trace_id(loaded), 0, 0): made}
    at.run()
    assert at.button(key="viewer_explain_keep").disabled
    assert any("past the" in c.value for c in at.caption)


def test_the_64th_explanation_is_kept_and_validates():
    tr = _trace()
    tr = tr.model_copy(update={"explanations": [_explanation(tr, diff=1.0 + i / 100) for i in range(63)]})
    at = _upload(tr)
    loaded = at.session_state["viewer_trace"][0]
    at.session_state[explain_view.RESULTS] = {(explain_view._trace_id(loaded), 0, 0): _explanation(tr, diff=9.0)}
    at.run()
    at.button(key="viewer_explain_keep").click().run()
    assert not at.exception, at.exception
    after = at.session_state["viewer_trace"][0]
    assert len(after.explanations) == 64
    trace_io.Trace.model_validate(after.model_dump())


def _branches(tr, ids):
    step = tr.steps[0]
    return [Branch(id=i, parent=0, at_step=0, steps=[step], stop_reason="max_new_tokens", output_text="a") for i in ids]


def test_branch_ids_never_pass_the_schema():
    tr = _trace()
    assert branching.next_branch_id(tr.model_copy(update={"branches": _branches(tr, [3, 7])})) == 8
    top = tr.model_copy(update={"branches": _branches(tr, [1, 1000])})
    new_id = branching.next_branch_id(top)
    assert new_id == 2
    extra = _branches(tr, [new_id])
    trace_io.Trace.model_validate(top.model_copy(update={"branches": top.branches + extra}).model_dump())


def test_the_65th_branch_is_refused_before_running():
    tr = _trace()
    at = _upload(tr.model_copy(update={"branches": _branches(tr, range(1, 65))}))
    submit = at.button(key=BRANCH_SUBMIT)
    assert submit.disabled
    assert any("already has 64 branches" in c.value for c in at.caption)
    assert not at.exception and len(at.session_state["viewer_trace"][0].branches) == 64


def test_only_ascii_digits_are_token_ids(tiny_llama):
    assert explain_view._contrast(" 12 ", None) == 12
    assert explain_view._contrast("٣", None) == "٣"  # Arabic-Indic three is text, not id 3
    assert explain_view._contrast("", 5) == 5
    from explorer_core.explain import ExplainError, resolve_contrast

    tr = _trace(steps=1)
    step = tr.steps[0].model_copy(update={"token_id": 3})
    with pytest.raises(ExplainError) as err:  # taken as text: its tokens, never id 3 (the chosen token)
        resolve_contrast(tiny_llama, step, "٣")
    assert "chosen token itself" not in str(err.value)


def test_a_100000_character_contrast_is_cut_and_never_echoed():
    at = _upload(_trace())
    at.text_input(key="viewer_explain_typed").set_value("z" * 100_000)  # as a crafted client could send it
    at.button(key=EXPLAIN_SUBMIT).click().run()
    assert not at.exception, at.exception
    assert at.text_input(key="viewer_explain_typed").value == "z" * explain_view.MAX_TYPED  # cut on the server
    assert at.text_input(key="viewer_explain_typed").proto.max_chars == explain_view.MAX_TYPED  # the browser counts
    for node in _nodes(at._tree):
        if getattr(node, "proto", None) is not None:
            assert "z" * 101 not in str(node.proto)


# -- 4. explanations: bounded passes, bounded time, stopped between passes ---------------------------------


def test_host_caps_integrated_gradients_passes(monkeypatch):
    from explorer_core.limits import Limits

    monkeypatch.setenv("EXPLORER_MAX_IG_PASSES", "16")
    assert Limits.from_env().max_ig_passes == 16
    with pytest.raises(ValueError, match="EXPLORER_MAX_IG_PASSES"):
        Limits.from_env().check_explain(1024)
    monkeypatch.setenv("EXPLORER_HOSTED", "1")
    monkeypatch.delenv("EXPLORER_MAX_IG_PASSES")
    hosted = Limits.from_env()
    assert hosted.max_ig_passes == 256 and hosted.max_explain_s == 180
    monkeypatch.setenv("EXPLORER_MAX_IG_PASSES", "16")
    at = _upload(_trace())
    assert at.number_input(key="viewer_explain_ig_steps").max == 16


@pytest.fixture(scope="module")
def tiny_trace(tiny_llama, tiny_llama_dir):
    from explorer_core.config import GenerationConfig
    from explorer_core.stepper import generate

    cfg = GenerationConfig(model=str(tiny_llama_dir), prompt="The sky is blue", max_new_tokens=2, min_new_tokens=2)
    return generate(tiny_llama, cfg).trace()


def test_integrated_gradients_stops_between_passes(tiny_llama, tiny_trace):
    from explorer_core.explain import Cancelled, explain

    asked = []

    def cancel():
        asked.append(1)
        return "the visitor left" if len(asked) > 2 else None  # the third: inside IG, before its gradients

    with pytest.raises(Cancelled, match="after 2 model passes: the visitor left"):
        explain(tiny_llama, tiny_trace, 1, methods=("integrated_gradients",), ig_steps=256, cancel=cancel)
    event = threading.Event()
    event.set()
    with pytest.raises(Cancelled, match="after 0 model passes"):
        explain(tiny_llama, tiny_trace, 1, cancel=event.is_set)


def test_a_stopped_session_frees_the_model_slot(tiny_llama, tiny_trace):
    """Streamlit stops a closed tab's script by raising at its next session-state access: the explanation's
    check between passes is one, so the slot is free again at once."""
    from streamlit.runtime.scriptrunner_utils.exceptions import StopException

    from explorer_core.explain import explain
    from explorer_ui import resources

    def session_gone():
        raise StopException()

    with pytest.raises(StopException):
        with resources.model_job():
            explain(tiny_llama, tiny_trace, 1, methods=("integrated_gradients",), cancel=session_gone)
    lock = resources.generation_lock()
    assert lock.acquire(blocking=False)
    lock.release()


def test_the_time_limit_is_a_reason_to_stop():
    check = explain_view.stop_check(time.monotonic() - 1, 180)
    assert "EXPLORER_MAX_EXPLAIN_S" in check()
    assert explain_view.stop_check(time.monotonic() + 3600, 3600)() is None


# -- 5. saved runs: regular files only ----------------------------------------------------------------


@pytest.fixture()
def saved_folder(tmp_path):
    tr = _trace()
    good = tmp_path / "good"
    good.mkdir()
    (good / "trace.json").write_text(trace_io.dumps(tr), encoding="utf-8")
    (tmp_path / "zero").mkdir()
    (tmp_path / "zero" / "trace.json").symlink_to("/dev/zero")
    (tmp_path / "pipe").mkdir()
    os.mkfifo(tmp_path / "pipe" / "trace.json")
    (tmp_path / "linked").symlink_to(good)  # a folder link: not followed (the run would be listed twice)
    return tmp_path


def test_saved_runs_lists_regular_files_only(saved_folder):
    found, note = loading.saved_traces(str(saved_folder))
    assert found == [saved_folder / "good" / "trace.json"] and note is None
    for bad in ("zero", "pipe"):
        with pytest.raises(TraceError, match="not a regular file"):
            loading.from_saved(saved_folder / bad / "trace.json")
    with pytest.raises(TraceError, match="nosuchuser"):
        loading.saved_traces("~nosuchuser/runs")


def test_saved_runs_in_the_viewer(saved_folder):
    at = start()
    at.switch_page("pages/viewer.py").run()
    at.radio(key="viewer_source").set_value("Saved runs").run()
    at.text_input(key="viewer_folder").input(str(saved_folder)).run()
    assert not at.exception, at.exception
    assert at.selectbox(key="viewer_run").options == [str(saved_folder / "good" / "trace.json")]
    assert at.session_state["viewer_trace"][0].model.name == "crafted"


# -- 6. temporary folders go with their session ---------------------------------------------------------


def _upload_with_companion(tmp_path):
    path = crafted.saved_pair(tmp_path / "src", crafted.trace(3, 2))
    comp = next(path.parent.glob("*.attn.safetensors"))
    at = _viewer(
        [
            ("trace.json", path.read_bytes(), "application/json"),
            ("trace.attn.safetensors", comp.read_bytes(), "application/octet-stream"),
        ]
    )
    store = at.session_state["viewer_trace"][1]
    assert store is not None
    folder = store.path.parent
    assert folder.name.startswith(f"explorer-upload-{os.getpid()}-") and folder.is_dir()
    return at, folder


def test_an_upload_folder_goes_when_its_session_is_released(tmp_path):
    at, folder = _upload_with_companion(tmp_path)
    at.session_state[tempfiles.KEY].release()
    assert not folder.exists()


def test_an_upload_folder_goes_when_its_session_is_dropped(tmp_path):
    at, folder = _upload_with_companion(tmp_path)
    del at
    gc.collect()
    assert not folder.exists()


def test_a_recording_folder_is_the_sessions(tiny_llama_dir):
    from tests.apphelp import use_model

    at = use_model(start(), tiny_llama_dir, max_new_tokens=2, min_new_tokens=2)
    at.button(key="gen_generate").click().run()
    assert not at.exception, at.exception
    folder = at.session_state["gen_trace"][1].path.parent
    assert folder.name.startswith(f"explorer-run-{os.getpid()}-") and folder.is_dir()
    at.session_state[tempfiles.KEY].release()
    assert not folder.exists()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_folders_of_dead_processes_are_swept(tmp_path):
    dead, old = _dead_pid(), time.time() - 3 * 3600
    made = {
        "dead_old": tmp_path / f"explorer-upload-{dead}-abc",
        "dead_run": tmp_path / f"explorer-run-{dead}-def",
        "dead_new": tmp_path / f"explorer-run-{dead}-new",
        "alive_old": tmp_path / f"explorer-upload-{os.getppid()}-ghi",
        "mine_old": tmp_path / f"explorer-upload-{os.getpid()}-jkl",
        "no_pid": tmp_path / "explorer-run-xyz",
        "other": tmp_path / f"other-{dead}-abc",
    }
    for name, path in made.items():
        path.mkdir()
        (path / "attention.safetensors").write_bytes(b"x")
        if name != "dead_new":
            os.utime(path, (old, old))
    removed = tempfiles.sweep_stale(tmp_path)
    assert sorted(removed) == sorted([made["dead_old"], made["dead_run"]])
    assert {n for n, p in made.items() if p.exists()} == {"dead_new", "alive_old", "mine_old", "no_pid", "other"}

"""A reload loses nothing: settings in the URL, recent runs on the server, a guard while a run goes; the
viewer shows its trace's own prompt and settings; the smaller items of the same issue."""

from __future__ import annotations

import os
import tempfile

import pytest

from explorer_core import tracefile
from explorer_core.config import GenerationConfig
from explorer_core.stepper import Run
from explorer_ui import live, tempfiles, views
from tests.apphelp import OTHER, ROOT, start, use_model


@pytest.fixture(autouse=True)
def recent_folder(tmp_path, monkeypatch):
    folder = tmp_path / "recent"
    monkeypatch.setenv("EXPLORER_RECENT_DIR", str(folder))
    return folder


def reload(at, page: str = "app.py"):
    """What F5 does: a new session of the same page with the same URL."""
    from streamlit.testing.v1 import AppTest

    fresh = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    for name, value in at.query_params.items():
        fresh.query_params[name] = value[0] if isinstance(value, list) else value
    if page != "app.py":
        fresh.switch_page(page)  # the first run is of that page, as a reload of its URL
    fresh.run()
    assert not fresh.exception, fresh.exception
    return fresh


def sidebar_texts(at) -> list[str]:
    return [t.value for t in at.sidebar.text]


# -- settings in the URL ---------------------------------------------------------------------------------


def test_settings_survive_a_reload_through_the_url(tiny_llama_dir):
    at = use_model(start(), tiny_llama_dir, max_new_tokens=7, temperature=0.35, chat=False)
    at.text_area(key="sidebar_prompt").input("Once upon a time").run()
    params = {k: (v[0] if isinstance(v, list) else v) for k, v in at.query_params.items()}
    assert params["max_new_tokens"] == "7" and params["temperature"] == "0.35" and params["chat"] == "false"
    assert params["model"] == str(tiny_llama_dir) and params["prompt"] == "Once upon a time"
    assert "top_p" not in params  # defaults stay out of the link
    again = reload(at)
    assert again.number_input(key="sidebar_max_new_tokens").value == 7
    assert again.slider(key="sidebar_temperature").value == pytest.approx(0.35)
    assert again.toggle(key="sidebar_chat").value is False
    assert again.selectbox(key="sidebar_model_choice").value == OTHER
    assert again.text_input(key="sidebar_model_custom").value == str(tiny_llama_dir)
    assert again.text_area(key="sidebar_prompt").value == "Once upon a time"


def test_bad_values_in_a_link_are_ignored_with_a_note():
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.query_params.update(max_new_tokens="lots", top_k="-3", temperature="0.5", colour="red")
    at.run()
    assert not at.exception
    assert at.number_input(key="sidebar_max_new_tokens").value == 60  # the default, not "lots"
    assert at.number_input(key="sidebar_top_k").value == 50
    assert at.slider(key="sidebar_temperature").value == pytest.approx(0.5)  # the good one is used
    notes = " ".join(sidebar_texts(at))
    assert "max_new_tokens='lots' is not a whole number" in notes and "top_k=-3 is out of range" in notes
    assert "colour" not in notes  # not ours: left alone
    assert not at.button(key="gen_generate").disabled


# -- recent runs ------------------------------------------------------------------------------------------


def test_a_finished_run_is_in_recent_runs_after_a_reload(tiny_llama_dir, recent_folder):
    at = use_model(start(), tiny_llama_dir, max_new_tokens=5, min_new_tokens=5, seed=3)
    at.button(key="gen_generate").click().run()
    assert not at.exception, at.exception
    made = at.session_state["gen_trace"][0]
    viewer = reload(at, "pages/viewer.py")  # the settings page was reloaded: the session's traces are gone
    viewer.radio(key="viewer_source").set_value("Recent runs").run()
    assert not viewer.exception, viewer.exception
    assert viewer.query_params["source"] in ("recent", ["recent"])
    trace, attn = viewer.session_state["viewer_trace"]
    assert [s.token_id for s in trace.steps] == [s.token_id for s in made.steps]
    assert attn is not None and attn.steps == 5
    again = reload(viewer, "pages/viewer.py")  # ?source=recent: the reload lands on the same list
    assert again.radio(key="viewer_source").value == "Recent runs"
    assert again.session_state["viewer_trace"][0].output_text == made.output_text


def test_recent_runs_are_bounded_and_a_host_lists_only_its_visitor(tiny_llama, recent_folder, monkeypatch):
    run = Run(tiny_llama, GenerationConfig(model="x", max_new_tokens=3, min_new_tokens=3))
    list(run)
    run.recorder.finish()
    monkeypatch.setenv("EXPLORER_RECENT_RUNS", "2")
    saved = [tempfiles.save_recent(run.trace(), run.attention(), owner) for owner in ("a" * 16, "b" * 16, "b" * 16)]
    assert not saved[0].exists() and saved[1].exists() and saved[2].exists()  # the oldest went
    assert [p.parent for p, _ in tempfiles.recent_runs()] == [saved[2], saved[1]]
    assert tempfiles.recent_runs(owner="a" * 16) == []
    loaded, attn = tracefile.load(saved[2] / "trace.json")
    assert loaded.output_text == run.trace().output_text and attn.steps == 3
    monkeypatch.setenv("EXPLORER_RECENT_MB", "0")  # each run is over the size cap: none is kept
    tempfiles.save_recent(run.trace(), None, "c" * 16)
    assert tempfiles.recent_runs() == []


def test_a_hosted_page_keeps_its_owner_in_the_url(monkeypatch):
    monkeypatch.setenv("EXPLORER_HOSTED", "1")
    at = start()
    owner = at.query_params["owner"]
    owner = owner[0] if isinstance(owner, list) else owner
    assert len(owner) == 16
    again = reload(at)
    assert again.session_state[tempfiles.OWNER_KEY] == owner


# -- leaving a running page -------------------------------------------------------------------------------


def test_a_running_page_asks_before_it_is_left(tiny_llama_dir, monkeypatch):
    at = use_model(start(), tiny_llama_dir, max_new_tokens=3, min_new_tokens=3)
    at.button(key="gen_generate").click().run()
    assert not any("explorer-running" in h.proto.body for h in at.get("html"))  # finished: no question asked

    def cut(run, config):  # the run is still going when the page is looked at
        raise ValueError("still running")

    monkeypatch.setattr(live, "stream_run", cut)
    at.button(key="gen_generate").click().run()
    guards = [h.proto.body for h in at.get("html") if "explorer-running" in h.proto.body]
    assert guards and "beforeunload" in guards[0] and "preventDefault" in guards[0]


# -- temporary folder cap ---------------------------------------------------------------------------------


def test_the_temporary_folder_has_a_cap(tiny_llama_dir, monkeypatch):
    held = tempfiles.new_folder(tempfiles.UPLOAD_PREFIX)
    try:
        (held / "big.bin").write_bytes(b"\0" * (2 * 2**20))
        monkeypatch.setenv("EXPLORER_TEMP_MB", "1")
        with pytest.raises(ValueError, match="EXPLORER_TEMP_MB=1"):
            tempfiles.new_folder(tempfiles.TEMP_PREFIX)
        at = use_model(start(), tiny_llama_dir, max_new_tokens=3, min_new_tokens=3)
        at.button(key="gen_generate").click().run()
        assert not at.exception
        assert at.error[0].value == "Could not start the run"
        assert "raise EXPLORER_TEMP_MB" in " ".join(t.value for t in at.text)
        monkeypatch.setenv("EXPLORER_TEMP_MB", "0")  # no cap
        tempfiles.check_room()
    finally:
        tempfiles._remove({str(held)})
    assert held.parent == type(held)(tempfile.gettempdir()) and not os.path.exists(held)


# -- the viewer shows its own trace -----------------------------------------------------------------------


def test_viewer_shows_the_traces_prompt_and_settings_not_generates():
    at = start()
    at.text_area(key="sidebar_prompt").input("A prompt of the Generate page").run()
    at.switch_page("pages/viewer.py").run()
    assert not at.exception, at.exception
    trace = at.session_state["viewer_trace"][0]
    keys = {getattr(w, "key", None) for w in at.sidebar}
    assert "sidebar_prompt" not in keys and "sidebar_temperature" not in keys
    settings = at.sidebar.dataframe[0].value
    assert dict(zip(settings["setting"], settings["value"]))["temperature"] == str(trace.config["temperature"])
    shown = [t.value for t in at.main.text]
    assert trace.config["prompt"] in shown
    assert all("A prompt of the Generate page" not in c for c in shown)
    assert "A prompt of the Generate page" in str(at.query_params["prompt"])  # kept in the viewer's URL too
    at.switch_page("app.py").run()  # the Generate page's values are still there
    assert at.text_area(key="sidebar_prompt").value == "A prompt of the Generate page"


def test_uploading_a_second_trace_replaces_the_first(tiny_llama, tmp_path):
    traces = []
    for seed in (1, 2):
        run = Run(tiny_llama, GenerationConfig(model="x", max_new_tokens=3, min_new_tokens=3, seed=seed))
        list(run)
        traces.append(tracefile.save(run.trace(), None, tmp_path / str(seed) / "trace.json").read_bytes())
    at = start()
    at.switch_page("pages/viewer.py").run()
    at.radio(key="viewer_source").set_value("Upload").run()
    up = at.file_uploader(key="viewer_upload")
    up.set_value([("trace.json", traces[0], "application/json")]).run()
    first = at.session_state["viewer_trace"][0]
    at.file_uploader(key="viewer_upload").set_value(
        [("trace.json", traces[0], "application/json"), ("trace (1).json", traces[1], "application/json")]
    ).run()
    assert not at.exception
    assert not at.error, [e.value for e in at.error]
    second = at.session_state["viewer_trace"][0]
    assert second.config["seed"] == 2 and first.config["seed"] == 1


# -- smaller items ----------------------------------------------------------------------------------------


def test_field_problems_show_under_the_field_in_its_words():
    at = start()
    at.number_input(key="sidebar_max_new_tokens").set_value(5).run()
    at.number_input(key="sidebar_min_new_tokens").set_value(9).run()
    errors = [e.value for e in at.sidebar.error]
    assert any(e.startswith("Min new tokens (9) is more than max new tokens (5)") for e in errors)
    at.number_input(key="sidebar_top_k").set_value(-1).run()
    assert any(e.startswith("Top k must be from 0 to") for e in (e.value for e in at.sidebar.error))


def test_chat_toggle_sits_with_the_prompt_and_the_page_says_how_it_read_it(tiny_llama_dir):
    at = start()
    order = [getattr(w, "key", None) for w in at.sidebar if getattr(w, "key", None)]
    assert order.index("sidebar_chat") == order.index("sidebar_prompt") + 1
    at = use_model(at, tiny_llama_dir, max_new_tokens=3, min_new_tokens=3, chat=False)
    at.button(key="gen_generate").click().run()
    assert any("Chat was off" in c.value for c in at.caption)
    line = next(c.value for c in at.caption if c.value.startswith("Weights:"))  # a tiny model's tiny numbers
    assert "attention recording for this" in line and " 0 MB" not in line


def test_stop_is_off_with_nothing_running_and_model_ready_shows_once(tmp_path):
    from tests import tiny

    folder = tiny.build("llama", tmp_path / "fresh")  # a model this process has not loaded yet
    at = use_model(start(), folder, max_new_tokens=3, min_new_tokens=3)
    assert at.button(key="gen_stop").disabled
    at.button(key="gen_generate").click().run()
    assert ready_boxes(at) == 1  # the first load says so
    at.button(key="gen_generate").click().run()  # the model is loaded now: no second status box
    assert ready_boxes(at) == 0
    assert at.button(key="gen_stop_idle").disabled  # off as soon as the run is over


def test_estimate_is_exact_in_the_rerun_that_loaded_the_model(tmp_path):
    from tests import tiny

    folder = tiny.build("llama", tmp_path / "fresh_estimate")  # not loaded by this process yet
    at = use_model(start(), folder, max_new_tokens=3, min_new_tokens=3)
    estimate = lambda: next(c.value for c in at.caption if c.value.startswith("Weights:"))  # noqa: E731
    assert "by its length" in estimate()
    at.button(key="gen_generate").click().run()  # this rerun loads the model and runs
    prompt_len = len(at.session_state["gen_trace"][0].prompt_ids)
    assert f"attention recording for this {prompt_len}-token prompt" in estimate()
    assert sum(c.value.startswith("Weights:") for c in at.caption) == 1  # redrawn in place, not added


def test_stream_is_a_clickable_component_of_escaped_tokens(tiny_llama_dir):
    """The drawn trace's stream is the click-to-inspect component (the browser test clicks it); its HTML
    carries each step's number and the same escaped spans as the export."""
    import json

    from explorer_core.markup import stream_html

    at = use_model(start(), tiny_llama_dir, max_new_tokens=4, min_new_tokens=4)
    at.button(key="gen_generate").click().run()
    trace = at.session_state["gen_trace"][0]
    (stream,) = [c for c in at.get("bidi_component") if c.proto.component_name == "explorer_stream_pick"]
    assert json.loads(stream.proto.json) == stream_html(trace.steps)
    assert all(f'data-step="{s.step}"' in json.loads(stream.proto.json) for s in trace.steps)


def ready_boxes(at) -> int:
    return sum(type(e).__name__ == "Status" and "Model ready" in e.label for e in at.main)


def test_penalty_off_button_sets_1():
    at = start()
    at.slider(key="sidebar_repetition_penalty").set_value(3.05).run()
    at.button(key="sidebar_repetition_penalty_off").click().run()
    assert at.slider(key="sidebar_repetition_penalty").value == 1.0
    assert at.button(key="sidebar_repetition_penalty_off").disabled


def test_estimate_on_a_fresh_cache_and_no_zero_mb(monkeypatch, tmp_path):
    from explorer_core import models

    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))  # nothing converted yet
    at = start()
    caption = next(c.value for c in at.caption if c.value.startswith("Weights:"))
    assert "about 5" in caption and "MB in float32" in caption  # 134.5 M parameters × 4 bytes
    # the prompt, counted from its length until the tokenizer is there: 51 bytes / 3 + a chat template's 30
    assert (
        "attention recording for this prompt (about 47 tokens by its length; exact once the model is loaded)" in caption
    )
    assert views.mb_text(0.2) == "0.2 MB" and views.mb_text(0.004) == "under 0.01 MB" and " 0 MB" not in caption


def test_prefill_reports_each_layer_and_changes_nothing(tiny_llama):
    cfg = GenerationConfig(model="x", max_new_tokens=4, min_new_tokens=4, seed=5)
    hooks = lambda: sum(len(m._forward_hooks) for m in tiny_llama.model.modules())  # noqa: E731
    plain = Run(tiny_llama, cfg)
    list(plain)
    before = hooks()  # the model's own (its first run's fidelity check installs the lens)
    seen = []
    watched = Run(tiny_llama, cfg)
    watched.on_prefill = lambda done, layers, s: seen.append((done, layers))
    list(watched)
    assert [s.token_id for s in watched.steps] == [s.token_id for s in plain.steps]
    assert seen == [(i + 1, tiny_llama.n_layers) for i in range(tiny_llama.n_layers)]
    assert hooks() == before  # the progress hooks are gone from the shared model


def test_tokens_per_second_counts_decoding_only(tiny_llama):
    run = Run(tiny_llama, GenerationConfig(model="x", max_new_tokens=2, min_new_tokens=2))
    list(run)
    timing = run.trace().timing
    assert timing.tokens_per_s == pytest.approx(1 / run.steps[1].time_s)
    assert live.decode_rate(run) == pytest.approx(timing.tokens_per_s)


def test_load_s_is_this_runs_wait(tiny_llama_dir):
    from explorer_ui import resources

    at = use_model(start(), tiny_llama_dir, max_new_tokens=3, min_new_tokens=3)
    at.button(key="gen_generate").click().run()
    at.button(key="gen_generate").click().run()
    lm = next(iter(resources.LOADED.values()))
    assert at.session_state["gen_trace"][0].timing.load_s != lm.load_s

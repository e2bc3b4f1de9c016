"""AppTest for every page: generate with a tiny model, inspect steps, stop mid-run, reload traces,
compare two models, open the heads grid. Charts are checked through their specs and data."""

from __future__ import annotations

import pytest

from explorer_core import frames, tracefile
from explorer_core.config import GenerationConfig
from explorer_core.markup import escape_text
from explorer_core.stepper import Run
from tests.apphelp import chart_titles, charts, start, use_model


def test_first_screen_has_every_control():
    at = start()
    keys = {w.key for w in at.sidebar.children.values() for w in _walk(w)}
    for name in (
        "prompt",
        "temperature",
        "top_p",
        "top_k",
        "repetition_penalty",
        "no_repeat_ngram_size",
        "max_new_tokens",
        "min_new_tokens",
        "block_eos_steps",
        "block_ws_steps",
        "stop_on",
        "seed",
        "chat",
        "top_n",
        "capture_attention",
        "attn_every",
        "model_choice",
    ):
        assert f"sidebar_{name}" in keys
    assert at.selectbox(key="sidebar_model_choice").value == "SmolLM2-135M-Instruct"
    assert at.info[0].value.startswith("Set the prompt")


def _walk(node):
    yield node
    for child in getattr(node, "children", {}).values():
        yield from _walk(child)


def chart_title(spec: dict):
    t = spec.get("title")
    return t.get("text") if isinstance(t, dict) else t


def topk_data(at):
    """The raw and processed top-k charts' rows together (each distribution is a chart of its own)."""
    import pandas as pd

    parts = [data[0] for spec, data in charts(at) if str(chart_title(spec)).startswith("Top candidates")]
    return pd.concat(parts[:2], ignore_index=True)


def test_generate_shows_tokens_and_charts(generated):
    at = generated
    assert at.metric[0].value == "8"
    trace, _ = at.session_state["gen_trace"]
    assert len(trace.steps) == 8 and trace.stop_reason == "max_new_tokens"
    titles = chart_titles(at)
    assert {"Top candidates: raw model", "Top candidates: after processing"} <= set(titles)
    assert "Chosen token over the run" in titles
    assert any(t.startswith("Attention of the sequence seen at step 0") for t in titles)
    assert any(t.startswith("Where step 0's query looked") for t in titles)
    top = topk_data(at)
    assert set(top["distribution"]) == {"raw model", "after processing"}
    chosen = top[top["chosen"]]
    assert set(chosen["token_id"]) == {trace.steps[0].token_id}
    raw = top[top["distribution"] == "raw model"]
    assert list(raw["token_id"]) == trace.steps[0].top_raw.ids
    assert list(raw["prob"]) == pytest.approx(trace.steps[0].top_raw.probs)


def test_changing_step_updates_charts(generated):
    at = generated
    at.slider(key="gen_step").set_value(5).run()
    trace, _ = at.session_state["gen_trace"]
    titles = chart_titles(at)
    top = topk_data(at)
    assert set(top[top["chosen"]]["token_id"]) == {trace.steps[5].token_id}
    _, heat = charts(at)[[t.startswith("Attention of the sequence seen at step 5") for t in titles].index(True)]
    assert heat[0]["q1"].max() == trace.prompt_len + 5  # query of step 5 sits at T+4, the last row
    assert list(heat[0][heat[0]["is_step"]]["q0"].unique()) == [trace.prompt_len + 4]
    assert at.code[0].value == trace.steps[5].label


def test_stop_mid_run_keeps_partial_trace(tiny_llama, tiny_llama_dir):
    at = use_model(start(), tiny_llama_dir)
    run = Run(tiny_llama, GenerationConfig(model=str(tiny_llama_dir), max_new_tokens=30, min_new_tokens=30))
    for i, _ in enumerate(run):  # the script was interrupted after 3 complete steps
        if i == 2:
            break
    at.session_state["gen_run"] = run
    at.run()  # the rerun a Stop click causes (the button itself is disabled between runs)
    assert not at.exception
    trace, attn = at.session_state["gen_trace"]
    assert trace.stop_reason == "interrupted" and len(trace.steps) == 3 and attn.steps == 3
    assert at.warning[0].value.startswith("Run stopped early")
    assert at.metric[0].value == "3"


def test_viewer_example_and_upload(generated, tmp_path):
    at = generated
    trace, attn = at.session_state["gen_trace"]
    at.switch_page("pages/viewer.py").run()
    assert not at.exception
    assert at.selectbox(key="viewer_example").options  # shipped examples are listed
    assert "Top candidates: raw model" in chart_titles(at)
    at.radio(key="viewer_source").set_value("Upload").run()
    path = tracefile.save(trace, attn, tmp_path / "trace.json")
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
    assert not at.exception
    loaded, loaded_attn = at.session_state["viewer_trace"]
    assert [s.token_id for s in loaded.steps] == [s.token_id for s in trace.steps] and loaded_attn is not None
    assert any(t.startswith("Attention of the sequence seen at step 0") for t in chart_titles(at))


def test_viewer_zip_upload_and_bad_file_keeps_previous(generated):
    at = generated
    trace, attn = at.session_state["gen_trace"]
    from explorer_ui.views import archive_bytes

    at.switch_page("pages/viewer.py").run()
    at.radio(key="viewer_source").set_value("Upload").run()
    at.file_uploader(key="viewer_upload").set_value(("trace.zip", archive_bytes(trace, attn), "application/zip")).run()
    assert at.session_state["viewer_trace"][0].output_text == trace.output_text
    at.file_uploader(key="viewer_upload").set_value(("trace.json", b"\x89PNG\r\n\x1a\n", "application/json")).run()
    assert not at.exception
    assert "cannot be shown" in at.error[0].value
    assert at.session_state["viewer_trace"][0].output_text == trace.output_text  # previous trace stays


def test_viewer_snapshot_only_trace_says_what_is_missing():
    at = start()
    at.switch_page("pages/viewer.py").run()
    at.selectbox(key="viewer_example").set_value("story-snapshots-only").run()
    assert not at.exception
    assert any("Full attention is not available" in i.value for i in at.info)
    assert "Last-layer attention snapshots (mean over heads)" in chart_titles(at)


def test_heads_page_grid(generated):
    at = generated
    at.switch_page("pages/heads.py").run()
    assert not at.exception
    grid_spec, grid_data = charts(at)[0]
    assert grid_spec["facet"]["field"] == "head"
    assert sorted(grid_data[0]["head"].unique()) == [0, 1, 2, 3]  # all heads of the layer at once


def test_compare_two_tiny_models(tiny_llama_dir, tiny_gpt2_dir):
    at = use_model(start(), tiny_llama_dir, max_new_tokens=6, min_new_tokens=6)
    at.switch_page("pages/compare.py").run()
    at.selectbox(key="compare_model_choice").set_value("Other (type a hub id or folder)").run()
    at.text_input(key="compare_model_custom").input(str(tiny_gpt2_dir)).run()
    at.button(key="compare_go").click().run()
    assert not at.exception, at.exception
    ta, _ = at.session_state["compare_a_trace"]
    tb, _ = at.session_state["compare_b_trace"]
    assert len(ta.steps) == len(tb.steps) == 6
    # both tiny models share the in-memory tokenizer: the step-aligned panel is shown
    titles = chart_titles(at)
    assert "How far model B is from model A, per step" in titles
    _, data = charts(at)[titles.index("How far model B is from model A, per step")]
    assert set(data[0]["measure"]) == {"KL(A‖B)", "JS(A,B)"} and len(data[0]) == 12
    assert (data[0]["value"] >= 0).all()


def test_compare_same_model_two_temperatures(tiny_llama_dir):
    """One model, only the temperature changed: the raw distributions are identical, so the page says so
    and plots the processed distributions' divergence (not float noise of the raw ones)."""
    at = use_model(start(), tiny_llama_dir, max_new_tokens=5, min_new_tokens=5, top_p=1.0, top_k=0)
    at.switch_page("pages/compare.py").run()
    at.slider(key="compare_temperature").set_value(1.5).run()
    at.button(key="compare_go").click().run()
    assert not at.exception
    frame, first, kind = at.session_state["compare_div"]
    assert kind == "processed" and set(frame["measure"]) == {"JS(A,B)"}
    assert (frame["value"] > 1e-4).all()  # temperature 0.8 against 1.5 is a real difference at every step
    assert any("raw distributions are identical" in t.value for t in at.text)
    titles = chart_titles(at)
    assert "How far run B's processed distribution is from run A's, per step" in titles
    # half-width columns: each top-k chart and the timelines take the column's width, so nothing is cut off
    tops = [spec for spec, _ in charts(at) if str(chart_title(spec)).startswith("Top candidates")]
    assert tops and all(spec["width"] == "container" for spec in tops)


def test_sidebar_values_kept_across_pages(tiny_llama_dir):
    at = use_model(start(), tiny_llama_dir, max_new_tokens=7, temperature=0.35)
    for page in ("pages/compare.py", "pages/heads.py", "app.py"):  # the viewer shows its trace's settings instead
        at.switch_page(page).run()
        assert not at.exception
        assert at.number_input(key="sidebar_max_new_tokens").value == 7
        assert at.slider(key="sidebar_temperature").value == pytest.approx(0.35)
        assert at.text_input(key="sidebar_model_custom").value == str(tiny_llama_dir)


def test_page_links_use_material_icons():
    at = start()
    links = at.get("page_link")
    assert [link.proto.label for link in links] == ["Generate", "Trace viewer", "Compare models", "Heads"]
    assert all(link.proto.icon.startswith(":material/") for link in links)


def test_out_of_range_number_refuses_to_generate():
    at = start()
    at.number_input(key="sidebar_max_new_tokens").set_value(100000).run()
    assert not at.exception
    assert "max_new_tokens=100000 is out of range" in at.sidebar.text[0].value
    assert at.button(key="gen_generate").disabled
    assert "not valid" in at.error[0].value


def test_empty_prompt_says_where_generation_starts():
    at = start()
    at.text_area(key="sidebar_prompt").input("").run()
    assert any("The prompt is empty" in i.value for i in at.info)
    at.toggle(key="sidebar_chat").set_value(False).run()
    assert any("starts from the BOS token" in i.value for i in at.info)


def test_one_tokens_per_second_figure(generated):
    """The metric is the only tokens/s on the page after a run (the README defines it)."""
    page_text = " ".join(str(getattr(el, "value", "")) for el in generated.main)
    assert page_text.count("tokens/s") == 0  # no second, differently measured figure in captions
    assert [m.label for m in generated.metric] == ["Tokens", "Tokens/s", "Prompt tokens"]


def test_attn_every_zero_records_no_snapshots(tiny_llama_dir):
    at = use_model(start(), tiny_llama_dir, max_new_tokens=4, min_new_tokens=4, attn_every=0)
    at.button(key="gen_generate").click().run()
    assert not at.exception, at.exception
    trace, attn = at.session_state["gen_trace"]
    assert attn is not None and all(s.attn_snapshot is None for s in trace.steps)
    assert trace.attention.snapshot_every == 0


def test_tab_stays_open_after_a_branch(tiny_llama_dir):
    at = use_model(start(), tiny_llama_dir, max_new_tokens=5, min_new_tokens=5)
    at.button(key="gen_generate").click().run()
    at.session_state["gen_tabs"] = "Branch from here"
    at.run()
    at.button(key="FormSubmitter:gen_trace_branch_form-Continue from here").click().run()
    assert not at.exception, at.exception
    assert at.session_state["gen_trace"][0].branches
    assert at.session_state["gen_tabs"] == "Branch from here"


def test_viewer_keeps_an_upload_across_pages(generated, tmp_path):
    at = generated
    trace, attn = at.session_state["gen_trace"]
    from explorer_ui.views import archive_bytes

    at.switch_page("pages/viewer.py").run()
    at.radio(key="viewer_source").set_value("Upload").run()
    at.file_uploader(key="viewer_upload").set_value(("trace.zip", archive_bytes(trace, attn), "application/zip")).run()
    assert at.session_state["viewer_trace"][0].created == trace.created
    at.switch_page("pages/heads.py").run()
    at.switch_page("pages/viewer.py").run()
    assert not at.exception
    assert at.radio(key="viewer_source").value == "Upload"
    assert at.session_state["viewer_trace"][0].created == trace.created  # no example swapped in


def test_viewer_good_file_after_a_bad_one(generated, tmp_path):
    at = generated
    trace, attn = at.session_state["gen_trace"]
    path = tracefile.save(trace, attn, tmp_path / "trace.json")
    at.switch_page("pages/viewer.py").run()
    at.radio(key="viewer_source").set_value("Upload").run()
    notes = ("notes.txt", b"my notes", "text/plain")
    at.file_uploader(key="viewer_upload").set_value(notes).run()
    assert "notes.txt" in at.text[0].value and "expected trace.json" in at.text[0].value
    at.file_uploader(key="viewer_upload").set_value(
        [notes, ("trace.json", path.read_bytes(), "application/json")]
    ).run()
    assert not at.exception
    assert not at.error  # the good file is loaded; the other is named as left out
    assert any("Left out" in w.value and "notes.txt" in w.value for w in at.warning)
    assert at.session_state["viewer_trace"][0].created == trace.created
    # a trace whose companion did not arrive says why it may be missing
    assert any("No attention companion" in w.value for w in at.warning)


def test_uploader_cap_is_the_server_cap():
    """One setting governs the uploader and the server: server.maxUploadSize, shown in words."""
    at = start()
    at.switch_page("pages/viewer.py").run()
    at.radio(key="viewer_source").set_value("Upload").run()
    uploader = at.get("file_uploader")[0]
    from streamlit import config as st_config

    cap = st_config.get_option("server.maxUploadSize")
    assert uploader.proto.max_upload_size_mb == cap
    assert any(f"Files over {cap} MB are refused" in c.value for c in at.caption)


def test_downloads_do_not_rerun(generated):
    """A rerun per download click replaced the files behind the other buttons mid-fetch."""
    buttons = generated.get("download_button")
    assert len(buttons) == 4
    assert all(b.proto.ignore_rerun for b in buttons)


def test_hosted_presets_are_the_allowlist(monkeypatch):
    monkeypatch.setenv("EXPLORER_HOSTED", "1")
    at = start()
    options = at.selectbox(key="sidebar_model_choice").options
    assert "TinyLlama/TinyLlama-1.1B-Chat-v1.0" not in options and not any(o.startswith("Other") for o in options)
    assert "SmolLM2-135M-Instruct" in options and "gpt2" in options


def test_a_new_run_removes_the_previous_runs_recording(tiny_llama_dir):
    """Each app run records into a temporary folder; the session keeps one, not one per run."""
    at = use_model(start(), tiny_llama_dir, max_new_tokens=4, min_new_tokens=4, seed=3)
    at.button(key="gen_generate").click().run()
    first = at.session_state["gen_trace"][1].path
    assert first.parent.name.startswith("explorer-run-") and first.exists()
    at.button(key="gen_generate").click().run()
    assert not at.exception, at.exception
    second = at.session_state["gen_trace"][1].path
    assert second != first and second.exists() and not first.parent.exists()


def _click_torn_step(at, key: str) -> int:
    """Click the last torn step's pill under the stream; the step inspector and the branch form follow it."""
    trace, _ = at.session_state[f"{key}_trace" if key == "gen" else "viewer_trace"]
    torn = [s.step for s in trace.steps if frames.is_torn(s)]
    assert len(torn) >= 2, "the tiny model is torn almost everywhere: this run should have torn steps"
    pills = at.pills(key=f"{key}_torn")
    assert pills.options[: len(torn)] == [f"{i} · {escape_text(trace.steps[i].label[:24])}" for i in torn]
    pills.set_value(torn[-1]).run()
    assert not at.exception, at.exception
    return torn[-1]


def _branch_form_is_at(at, key: str, state_key: str, step: int) -> None:
    trace, _ = at.session_state[state_key]
    s = trace.steps[step]
    assert at.slider(key=f"{key}_step").value == step
    assert at.session_state[f"{key}_tabs"] == "Branch from here"
    assert at.pills(key=f"{key}_torn").value == step  # the inspected step's pill is lit
    assert any(c.value.startswith(f"Branch from step {step} of the main run") for c in at.caption)
    # the form offers this step's candidates, the token it took last
    assert at.selectbox(key=f"{state_key}_branch_pick").options[-1].startswith(f"{s.label}  (id {s.token_id})")


def test_torn_step_opens_the_branch_form_live(tiny_llama_dir):
    """Generate page: a click on a torn step inspects it, opens 'Branch from here' there, and branching
    from the form splits the run at that step."""
    at = use_model(start(), tiny_llama_dir, max_new_tokens=6, min_new_tokens=6, seed=3)
    at.button(key="gen_generate").click().run()
    step = _click_torn_step(at, "gen")
    _branch_form_is_at(at, "gen", "gen_trace", step)
    at.button(key="FormSubmitter:gen_trace_branch_form-Continue from here").click().run()
    assert not at.exception, at.exception
    assert [b.at_step for b in at.session_state["gen_trace"][0].branches] == [step]
    # elsewhere and back: a click on the lit pill (which unselects it) opens the form at that step again
    at.session_state["gen_tabs"] = "Candidates"
    at.run()
    at.pills(key="gen_torn").set_value(None).run()
    _branch_form_is_at(at, "gen", "gen_trace", step)


def test_torn_step_opens_the_branch_form_in_the_viewer(generated):
    at = generated
    trace, attn = at.session_state["gen_trace"]
    from explorer_ui.views import archive_bytes

    at.switch_page("pages/viewer.py").run()
    at.radio(key="viewer_source").set_value("Upload").run()
    at.file_uploader(key="viewer_upload").set_value(("trace.zip", archive_bytes(trace, attn), "application/zip")).run()
    step = _click_torn_step(at, "viewer")
    _branch_form_is_at(at, "viewer", "viewer_trace", step)
    at.button(key="FormSubmitter:viewer_trace_branch_form-Continue from here").click().run()
    assert not at.exception, at.exception
    assert [b.at_step for b in at.session_state["viewer_trace"][0].branches] == [step]


def test_torn_pills_are_capped(tiny_llama_dir):
    """A long run torn at most steps shows MAX_TORN_PILLS of them (the closest calls) and says how many there are."""
    from explorer_ui.branching import MAX_TORN_PILLS

    at = use_model(start(), tiny_llama_dir, max_new_tokens=90, min_new_tokens=90, seed=3)
    at.button(key="gen_generate").click().run()
    assert not at.exception, at.exception
    torn = sum(frames.is_torn(s) for s in at.session_state["gen_trace"][0].steps)
    assert torn > MAX_TORN_PILLS, "the tiny model is torn almost everywhere"
    pills = at.pills(key="gen_torn")
    assert len(pills.options) == MAX_TORN_PILLS and f"Torn at {torn} of 90 steps" in pills.label

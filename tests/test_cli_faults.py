"""Disk and folder faults around the CLI: a full disk keeps the steps before it, two runs share a folder
safely, a bad output path is refused before any model work, the model cache heals, trace.json names no
path of the author's machine, and a run never makes a trace.json over the size cap."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest

from explorer_core import models, stepper, tracefile
from explorer_core import trace as trace_format
from explorer_core.attnstore import AttentionWriter
from explorer_core.cli import main as cli_main
from explorer_core.config import GenerationConfig
from explorer_core.stepper import Run

ENOSPC = OSError(errno.ENOSPC, "No space left on device")


def _cli(model_dir: Path, out: Path, *extra: str) -> int:
    steps = ["--max_new_tokens", "8", "--min_new_tokens", "8"] if "--max_new_tokens" not in extra else []
    return cli_main(["--model", str(model_dir), *steps, *extra, "--out_dir", str(out), "--no_png", "-q"])


class _Disk:
    """The writer's file on a disk with `room` bytes: a write past it puts what fits, then fails (or,
    `buffered`, is taken and lost, and the next write fails: a write buffer that could not be flushed)."""

    def __init__(self, fh, room: int, buffered: bool) -> None:
        self.fh, self.room, self.buffered, self.lost = fh, room, buffered, False

    def write(self, data) -> int:
        data = bytes(data)
        pos = self.fh.tell()
        if self.lost or pos + len(data) > self.room:
            if self.buffered and not self.lost:
                self.lost = True
                return len(data)
            self.fh.write(data[: max(0, self.room - pos)])
            self.fh.flush()
            raise ENOSPC
        return self.fh.write(data)

    def __getattr__(self, name):
        return getattr(self.fh, name)


def _disk_fills(monkeypatch, folder: Path, rows: int, buffered: bool = False) -> None:
    """The run recording into `folder` finds the disk full half way through row `rows` (probe runs elsewhere are spared)."""
    real = AttentionWriter.__init__

    def init(self, path, shape, max_steps):
        real(self, path, shape, max_steps)
        if Path(path).parent == folder:
            room = 8 + self.header_room + shape.prompt_bytes() + sum(shape.row_bytes(s) for s in range(rows))
            self._fh = _Disk(self._fh, room + shape.row_bytes(rows) // 2, buffered)

    monkeypatch.setattr(AttentionWriter, "__init__", init)


# -- task 1: a full disk ----------------------------------------------------------------------------
def test_full_disk_mid_row_saves_the_steps_and_a_whole_companion(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _disk_fills(monkeypatch, out, rows=3)
    assert _cli(tiny_llama_dir, out) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert f"could not write attention to {out}: No space left on device" in last
    assert "the 3 steps before it were saved" in last
    trace, store = tracefile.load(out / "trace.json")
    assert len(trace.steps) == 3 and trace.stop_reason == "interrupted"
    assert store is not None and store.steps == 3  # cut back to its last whole row
    assert store.row(2, 0, None).shape == (trace.prompt_len + 2,)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no .part or temporary file


def test_full_disk_with_rows_lost_in_the_buffer_keeps_every_step(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _disk_fills(monkeypatch, out, rows=2, buffered=True)
    assert _cli(tiny_llama_dir, out) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "No space left on device" in err
    trace, store = tracefile.load(out / "trace.json")
    assert len(trace.steps) == 3  # row 2 was taken, then lost: its step is kept, the companion is not
    assert store is None and "holds 2 whole rows of 3 steps" in err
    assert not list(out.glob("*.attn.safetensors")) and not [p for p in out.iterdir() if p.name.startswith(".")]


def test_trace_json_that_cannot_be_written_is_one_line_and_leaves_nothing(
    tiny_llama_dir, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    real = tracefile._atomic_write

    def full(path, data):
        if Path(path).name == "trace.json":
            raise ENOSPC
        real(path, data)

    monkeypatch.setattr(tracefile, "_atomic_write", full)
    assert _cli(tiny_llama_dir, out) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"error: could not write {out / 'trace.json'}: No space left on device" in err
    assert sorted(p.name for p in out.iterdir()) == []  # the companion nobody names was removed


# -- task 2: two runs, one folder -------------------------------------------------------------------
def _recording_run(lm, folder: Path, n: int, seed: int) -> Run:
    cfg = GenerationConfig(model="x", max_new_tokens=n, min_new_tokens=n, seed=seed)
    run = Run(lm, cfg, attention_path=str(tracefile.recording_path(folder / "trace.json")))
    for _ in run:
        pass
    run.recorder.finish()
    return run


def test_clean_up_spares_a_live_writers_file_however_old(tiny_llama, tmp_path):
    run = _recording_run(tiny_llama, tmp_path, 2, seed=1)
    old = time.time() - 2 * tracefile.STALE_S
    live, dead, fresh = (tracefile.recording_path(tmp_path / "trace.json") for _ in range(3))
    for p in (live, dead, fresh):
        p.write_bytes(b"\0" * 64)
    claimed = tracefile.claim(live)  # a run in a long prefill: nothing written for minutes
    os.utime(live, (old, old))
    os.utime(dead, (old, old))
    try:
        tracefile.save(run.trace(), run.attention(), tmp_path / "trace.json")
    finally:
        if claimed is not None:
            os.close(claimed)
    assert live.exists() and fresh.exists() and not dead.exists()
    assert tracefile.load(tmp_path / "trace.json")[1].steps == 2


def test_a_save_between_anothers_companion_and_its_trace_deletes_nothing_live(tiny_llama, tmp_path, monkeypatch):
    """Run B saves while run A has moved its companion in but not yet written trace.json: B waits for A,
    and the folder ends with B's pair, whole (before, B's clean-up removed A's companion, then A's trace.json
    named a missing file and A's clean-up removed B's)."""
    a, b = _recording_run(tiny_llama, tmp_path, 2, seed=1), _recording_run(tiny_llama, tmp_path, 3, seed=2)
    real, other = tracefile._atomic_write, {}

    def write(path, data):
        if Path(path).name == "trace.json" and "b" not in other:  # A, half way through its commit
            other["b"] = threading.Thread(
                target=tracefile.save, args=(b.trace(), b.attention(), tmp_path / "trace.json")
            )
            other["b"].start()
            other["b"].join(timeout=2)  # B runs now, unless the folder's lock holds it
        real(path, data)

    monkeypatch.setattr(tracefile, "_atomic_write", write)
    _, a_name = tracefile.save_pair(a.trace(), a.attention(), tmp_path / "trace.json")
    other["b"].join()
    trace, store = tracefile.load(tmp_path / "trace.json")
    assert len(trace.steps) == 3 and store is not None and store.steps == 3  # B's pair, B saved last
    assert len(list(tmp_path.glob("*.attn.safetensors"))) == 1 and not (tmp_path / a_name).exists()


# -- task 3: output paths checked before the work ---------------------------------------------------
def _no_model_work(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded although the output path was bad")

    monkeypatch.setattr(models, "load", refuse)


def test_unwritable_out_dir_is_refused_before_loading(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    _no_model_work(monkeypatch)
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    assert _cli(tiny_llama_dir, blocker, "--no_companion") == 2
    assert f"--out_dir {blocker} is a file, not a folder" in capsys.readouterr().err
    assert _cli(tiny_llama_dir, blocker / "run", "--no_companion") == 2
    assert "is not writable (Not a directory)" in capsys.readouterr().err
    assert blocker.read_text() == "not a folder"


@pytest.fixture(scope="module")
def saved_trace(tiny_llama, tmp_path_factory, tiny_llama_dir):
    cfg = GenerationConfig(model=str(tiny_llama_dir), max_new_tokens=3, min_new_tokens=3, seed=1)
    run = Run(tiny_llama, cfg)
    for _ in run:
        pass
    run.recorder.discard()
    return tracefile.save(run.trace(), None, tmp_path_factory.mktemp("explain") / "trace.json")


def test_explain_out_to_a_missing_folder_is_refused_before_computing(saved_trace, tmp_path, monkeypatch, capsys):
    _no_model_work(monkeypatch)
    out = tmp_path / "no" / "such" / "why.json"
    assert cli_main(["explain", str(saved_trace), "--step", "0", "--out", str(out)]) == 2
    assert f"--out {out} is in {out.parent}, which does not exist" in capsys.readouterr().err
    assert cli_main(["explain", str(saved_trace), "--step", "0", "--out", str(tmp_path)]) == 2
    assert "is a folder: give a file name" in capsys.readouterr().err


def test_explain_result_is_printed_when_its_file_cannot_be_written(saved_trace, tmp_path, monkeypatch, capsys):
    out = tmp_path / "why.json"
    monkeypatch.setattr(tracefile, "_atomic_write", lambda path, data: (_ for _ in ()).throw(ENOSPC))
    code = cli_main(["explain", str(saved_trace), "--step", "1", "--methods", "grad_x_input", "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 1 and not out.exists()
    assert f"could not write {out}: No space left on device; the result is printed above" in printed.err
    assert json.loads(printed.out)["step"] == 1  # computed once, kept


# -- task 4: the converted default model's cache ----------------------------------------------------
EMBEDDED = models.ModelSource("default", "/nowhere", gguf_file="model.gguf", embedded=True)


def test_unwritable_cache_names_the_variable_before_converting(tmp_path, monkeypatch):
    (tmp_path / "file.txt").write_text("x")
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "file.txt" / "cache"))
    monkeypatch.setattr(models, "_convert", lambda *a: pytest.fail("converted into a cache it cannot write"))
    with pytest.raises(models.ModelLoadError, match=r"set EXPLORER_CACHE_DIR to a folder you can write to"):
        models.ensure_converted(EMBEDDED)


def test_damaged_conversion_is_converted_again(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    done = []
    monkeypatch.setattr(
        models,
        "_convert",
        lambda source, folder: done.append(shutil.copytree(tiny_llama_dir, folder, dirs_exist_ok=True)),
    )
    folder = models.ensure_converted(EMBEDDED)
    assert models.ensure_converted(EMBEDDED) == folder and len(done) == 1  # whole: used as it is
    weights = folder / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 100)
    assert "its header describes" in models.conversion_damage(folder)
    models.ensure_converted(EMBEDDED)
    assert len(done) == 2 and models.conversion_damage(folder) is None
    (folder / "config.json").write_text("{")
    assert models.conversion_damage(folder).startswith("JSONDecodeError")
    models.ensure_converted(EMBEDDED)
    assert len(done) == 3 and models.load(str(folder)).n_layers == 2


# -- task 5: no path of the author's machine --------------------------------------------------------
def test_trace_names_the_model_folder_not_its_absolute_path(tiny_llama, tiny_llama_dir, tmp_path, monkeypatch):
    cfg = GenerationConfig(model="x", max_new_tokens=1, min_new_tokens=1, capture_attention=False)
    info = Run(tiny_llama, cfg).trace().model
    assert info.location == tiny_llama_dir.name and not info.location.startswith("/")
    monkeypatch.chdir(tiny_llama_dir.parent)
    assert models.public_location(tiny_llama.source) == tiny_llama_dir.name  # relative to the working folder
    assert models.public_location(models.ModelSource("gpt2", "gpt2")) == "gpt2"  # a hub id as it is
    assert models.public_location(EMBEDDED).startswith(models.WHEEL)


# -- task 6: trace.json never passes the size cap -----------------------------------------------------
CAP = 100_000  # bytes: a few steps of top_n 50 with the logit lens on the tiny model
BIG = ["--top_n", "50", "--logit_lens", "true", "--block_eos_steps", "2048", "--clean_stop", "false"]  # no early stop


def test_max_new_tokens_that_could_pass_the_cap_is_refused_naming_the_largest(
    tiny_llama_dir, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(trace_format, "MAX_TRACE_BYTES", CAP)
    assert _cli(tiny_llama_dir, tmp_path / "a", *BIG, "--max_new_tokens", "400") == 2
    err = capsys.readouterr().err
    assert "over the 0.1 MiB limit for traces" in err and "top_n=50, the logit lens over 2 layers" in err
    largest = int(re.search(r"use max_new_tokens=(\d+) or less", err).group(1))
    assert 1 < largest < 400 and not (tmp_path / "a" / "trace.json").exists()
    assert _cli(tiny_llama_dir, tmp_path / "b", *BIG, "--max_new_tokens", str(largest)) == 0, capsys.readouterr().err
    trace, _ = tracefile.load(tmp_path / "b" / "trace.json")
    assert len(trace.steps) == largest and (tmp_path / "b" / "trace.json").stat().st_size <= CAP
    more = ["--max_new_tokens", str(largest + 1)]
    assert _cli(tiny_llama_dir, tmp_path / "c", *BIG, *more) == 2


def test_run_stops_before_a_step_that_would_pass_the_cap(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(trace_format, "MAX_TRACE_BYTES", CAP)
    monkeypatch.setattr(stepper, "step_bytes", lambda *a: 1)  # an estimate that misses: the run's own check holds
    out = tmp_path / "run"
    assert _cli(tiny_llama_dir, out, *BIG, "--max_new_tokens", "200") == 1
    err = capsys.readouterr().err
    assert (
        "would take trace.json past its 0.1 MiB limit, so the run stopped before it" in err and "Traceback" not in err
    )
    trace, store = tracefile.load(out / "trace.json")
    assert 1 < len(trace.steps) < 200 and trace.stop_reason == "interrupted" and store.steps == len(trace.steps)
    assert (out / "trace.json").stat().st_size <= CAP


@pytest.mark.parametrize("name", ["~nosuchuser/x", "a" * 300])
def test_an_unloadable_model_name_in_a_trace_is_one_line_in_the_cli(name, tmp_path, capsys):
    """replay and explain load the model the trace names: a name no path or hub id can be made of is one
    sentence, the name cut short, exit 2."""
    from explorer_core import cli
    from explorer_core.trace import dumps
    from tests import crafted

    tr = crafted.trace(8, 2)
    model = tr.model.model_copy(update={"name": name})
    path = tmp_path / "trace.json"
    path.write_text(
        dumps(tr.model_copy(update={"attention": None, "model": model, "config": dict(tr.config, model=name)}))
    )
    for args in (["replay", str(path)], ["explain", str(path), "--step", "0"]):
        assert cli.main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "neither a folder nor a hub id" in err and len(err) < 400

"""trace.json: round trip, committed JSON Schema, atomic writes, companion checks, the CLI's artifacts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from explorer_core import trace as trace_io
from explorer_core import tracefile
from explorer_core.cli import main as cli_main
from explorer_core.config import GenerationConfig
from explorer_core.stepper import generate
from explorer_core.trace import TraceError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tiny_llama):
    return generate(tiny_llama, GenerationConfig(model="x", max_new_tokens=12, min_new_tokens=12, attn_every=4))


def test_round_trip_is_equal(run, tmp_path):
    trace, attn = run.trace(), run.attention()
    path = tracefile.save(trace, attn, tmp_path / "trace.json")
    loaded, loaded_attn = tracefile.load(path)
    assert loaded.model_copy(update={"attention": trace.attention}) == trace
    assert loaded.attention.file.startswith("trace.") and loaded.attention.file.endswith(".attn.safetensors")
    assert loaded_attn.steps == attn.steps == 12
    for s in range(12):
        np.testing.assert_array_equal(loaded_attn.row_all(s), attn.row_all(s))
    again = tmp_path / "again.json"
    tracefile.save(loaded, loaded_attn, again)
    reread = tracefile.load(again)[0]
    assert reread == loaded.model_copy(update={"attention": reread.attention})
    assert reread.attention.file.startswith("again.")


def test_json_is_plain_and_readable(run, tmp_path):
    path = tracefile.save(run.trace(), None, tmp_path / "t.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["schema_version"] == 2 and data["config"]["max_new_tokens"] == 12
    assert {"torch", "transformers", "python"} <= set(data["versions"])
    assert data["steps"][0]["attn_snapshot"] is not None and data["steps"][1]["attn_snapshot"] is None
    assert oct(path.stat().st_mode & 0o777) != "0o600"


def test_committed_schema_matches_code():
    assert (ROOT / "trace.schema.json").read_text() == trace_io.json_schema(), "run `make schema` and commit it"


def test_interrupted_write_leaves_old_file(run, tmp_path, monkeypatch):
    path = tracefile.save(run.trace(), None, tmp_path / "trace.json")
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", boom)  # dies mid-write, after bytes went to the temp file
    with pytest.raises(KeyboardInterrupt):
        tracefile.save(run.trace(), None, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["trace.json"]  # no temp file left behind


def test_companion_of_another_run_is_a_trace_error(run, tiny_llama, tmp_path):
    path = tracefile.save(run.trace(), run.attention(), tmp_path / "trace.json")
    other = generate(tiny_llama, GenerationConfig(model="x", max_new_tokens=11, min_new_tokens=11, attn_every=4))
    name = tracefile.load(path)[0].attention.file
    with open(tmp_path / name, "wb") as fh:  # a complete companion, but of 11 steps
        other.attention().write_to(fh)
    with pytest.raises(TraceError, match="this trace needs"):
        tracefile.load(path)


@pytest.mark.parametrize(
    "payload,needle",
    [
        (b"", "the file is empty"),
        (b"\x89PNG\r\n", "not valid JSON"),
        (b'{"schema_version": 99}', "unsupported schema_version"),
        (b'{"schema_version": 2, "schema_version": 2}', "invalid trace at"),
        (b'{"schema_version": 1}', "invalid trace at"),
    ],
)
def test_bad_files_raise_one_error_type(payload, needle):
    with pytest.raises(TraceError, match=needle):
        trace_io.parse(payload)


def test_cli_writes_every_artifact(tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    code = cli_main(
        [
            "--model",
            str(tiny_llama_dir),
            "--prompt",
            "Hello",
            "--max_new_tokens",
            "12",
            "--min_new_tokens",
            "12",
            "--attn_every",
            "5",
            "--out_dir",
            str(out),
            "-q",
        ]
    )
    assert code == 0
    names = sorted(p.name for p in out.iterdir() if not p.name.endswith(".attn.safetensors"))
    assert len(list(out.glob("trace.*.attn.safetensors"))) == 1
    assert names == [
        "attn_step_0000.png",
        "attn_step_0005.png",
        "attn_step_0010.png",
        "final_step_token_probs.png",
        "output.txt",
        "prompt_attention_heatmap.png",
        "timeline.png",
        "trace.json",
    ]
    assert (out / "final_step_token_probs.png").read_bytes()[:4] == b"\x89PNG"
    trace, attn = tracefile.load(out / "trace.json")
    assert len(trace.steps) == 12 and attn is not None
    assert (out / "output.txt").read_text(encoding="utf-8").strip() == trace.output_text.strip()


def test_cli_rejects_bad_flag_with_message(capsys):
    assert cli_main(["--temperature", "9", "-q"]) == 2
    assert "temperature=9.0 is out of range: use a value from 0.0 to 5.0" in capsys.readouterr().err


def test_cli_unknown_model_is_one_sentence(capsys, tmp_path):
    assert cli_main(["--model", "no-such-org/no-such-model", "--out_dir", str(tmp_path), "-q"]) == 2
    err = capsys.readouterr().err
    assert "no-such-org/no-such-model" in err and "Traceback" not in err


def test_cli_attn_every_zero_writes_no_snapshots(tiny_llama_dir, tmp_path):
    """The seed's `--attn_every 0`: no attn_step_*.png and no snapshots in trace.json."""
    out = tmp_path / "run"
    args = ["--model", str(tiny_llama_dir), "--prompt", "Hi", "--max_new_tokens", "4", "--min_new_tokens", "4"]
    assert cli_main([*args, "--attn_every", "0", "--out_dir", str(out), "-q"]) == 0
    assert not list(out.glob("attn_step_*.png"))
    trace, attn = tracefile.load(out / "trace.json")
    assert attn is not None and trace.attention.snapshot_every == 0
    assert all(s.attn_snapshot is None for s in trace.steps)

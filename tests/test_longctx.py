"""Long prompts: the capture path, the streamed companion (round trip, lazy reads, damage), pooled
views of any length, exact recomputation, schema-1 traces, pair saving and the run's bad-input paths."""

from __future__ import annotations

import errno
import io
import json
import os
import struct

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from explorer_core import attnview, recompute, tracefile
from explorer_core.attnstore import AttentionFileError, open_store
from explorer_core.cli import main as cli_main
from explorer_core.config import GenerationConfig
from explorer_core.limits import Limits
from explorer_core.stepper import Run
from explorer_core.trace import TraceError
from tests.tiny import CORPUS, eager_attentions

LONG_PROMPT = " ".join(CORPUS[:32])  # about 1,300 tokens with the tiny tokenizer


def long_run(lm, n: int = 6, budget: int | None = None, dtype: str = "float16", **cfg) -> Run:
    limits = Limits(prompt_attention_mb=budget) if budget is not None else None
    config = GenerationConfig(model="x", prompt=LONG_PROMPT, chat=False, max_new_tokens=n, min_new_tokens=n, **cfg)
    run = Run(lm, config, limits, attention_dtype=dtype)
    for _ in run:
        pass
    return run


def pool(prompt: np.ndarray, width: int) -> np.ndarray:
    """Reference pooling, whole matrix at once: (layers, heads, T, T) -> mean over each cell's pairs."""
    t = prompt.shape[-1]
    edges = np.append(np.arange(0, t, width), t)
    sums = np.add.reduceat(np.add.reduceat(prompt.astype(np.float32), edges[:-1], axis=2), edges[:-1], axis=3)
    sizes = np.diff(edges).astype(np.float32)
    return sums / (sizes[:, None] * sizes[None, :])


@pytest.fixture(scope="module")
def pooled(tiny_llama_long):
    """A 1,000+-token prompt whose own attention is pooled (a 1 MiB budget), and the eager reference."""
    run = long_run(tiny_llama_long, budget=1)
    t = run.prompt_len
    return run, eager_attentions(tiny_llama_long, run.ids[:, : t + 5])


def test_long_prompt_rows_equal_eager_after_float16(pooled):
    run, full = pooled
    store, t = run.attention(), run.prompt_len
    assert t >= 1000 and store.shape.dtype == "float16" and not store.exact_prompt
    for s in range(store.steps):  # step s: the query at position t+s-1, over keys 0..t+s-1
        want = full[:, :, t + s - 1, : t + s]
        np.testing.assert_allclose(store.row_all(s), want, atol=1e-3, rtol=0)


def test_pooled_prompt_cells_are_means_of_the_true_matrix(pooled):
    run, full = pooled
    store, t = run.attention(), run.prompt_len
    want = pool(full[:, :, :t, :t], -(-t // store.shape.bins))  # (layers, heads, B, B)
    got = np.stack([[store.prompt_cells(layer, h) for h in range(store.heads)] for layer in range(store.layers)])
    np.testing.assert_allclose(got, want, atol=1e-3)
    sizes = np.diff(store.edges())
    mass = (got * sizes[None, None, :, None] * sizes[None, None, None, :]).sum(axis=(-1, -2))
    np.testing.assert_allclose(mass, t, rtol=1e-3)  # every prompt row's weights sum to 1


def test_exact_recompute_equals_eager(pooled, tiny_llama_long):
    run, full = pooled
    rows = recompute.prompt_rows(tiny_llama_long, run.ids[0, : run.prompt_len].tolist(), 1, 600, 700)
    np.testing.assert_allclose(rows, full[1, :, 600:700, : run.prompt_len], atol=1e-5)
    with pytest.raises(ValueError, match="layer 9 does not exist"):
        recompute.prompt_rows(tiny_llama_long, [1, 2, 3], 9, 0, 2)


def test_companion_is_standard_safetensors_and_read_lazily(pooled, tmp_path):
    run, _ = pooled
    path = tracefile.save(run.trace(), run.attention(), tmp_path / "trace.json")
    trace, store = tracefile.load(path)
    plain = load_file(str(store.path))  # safetensors' own reader agrees with ours
    assert len(plain) == 2 + store.steps
    np.testing.assert_array_equal(plain["row.00003"][1, 2], store.row(3, 1, 2).astype(np.float16))
    reads = []
    real = os.pread
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "pread", lambda fd, n, off: reads.append(n) or real(fd, n, off))
        one = store.row(2, 0, None)  # the mean over heads of one layer of one step
    assert one.shape == (trace.prompt_len + 2,) and abs(one.sum() - 1) < 1e-2
    assert reads == [store.heads * (trace.prompt_len + 2) * 2]  # that layer of that step, nothing more


def test_companion_truncated_while_open_is_an_error_not_a_crash(pooled, tmp_path):
    """A file cut short by someone else after it was admitted: the next view reads a clear error (a
    mapped file would have killed the server with SIGBUS)."""
    run, _ = pooled
    _, store = tracefile.load(tracefile.save(run.trace(), run.attention(), tmp_path / "trace.json"))
    os.truncate(store.path, store.nbytes() // 2)
    with pytest.raises(AttentionFileError, match="truncated"):
        store.row(store.steps - 1, 0, None)


def _finished(run, tmp_path):
    path = tracefile.save(run.trace(), run.attention(), tmp_path / "trace.json")
    return path, tmp_path / tracefile.load(path)[0].attention.file


def test_damaged_companions_are_refused_with_a_reason(tiny_llama, tmp_path):
    run = Run(tiny_llama, GenerationConfig(model="x", max_new_tokens=3, min_new_tokens=3))
    for _ in run:
        pass
    path, comp = _finished(run, tmp_path)
    good = comp.read_bytes()
    (n,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8 : 8 + n])
    cases = {
        "truncated": (good[:-100], "truncated or padded"),
        "unfinished": (b"\0" * 8 + good[8:], "was not finished"),
        "huge header": (struct.pack("<Q", 2**40) + good[8:], "which the file cannot hold"),
        "not json": (good[:8] + b"{" * n + good[8 + n :], "not an attention companion"),
    }
    entry = json.dumps({"row.00001": header["row.00001"]}, separators=(",", ":"))[1:-1].encode()
    lying = entry.replace(b'"shape":[2,', b'"shape":[9,')  # same length: only the claim changes
    cases["shape lies"] = (good.replace(entry, lying), "tensor row.00001")
    for data, needle in cases.values():
        comp.write_bytes(data)
        with pytest.raises(TraceError, match=needle):
            tracefile.load(path)
        comp.write_bytes(good)
    assert tracefile.load(path)[1].steps == 3


def test_heatmap_cells_stay_within_budget_and_exact_when_they_fit(pooled, tiny_llama):
    run, full = pooled
    trace, store = run.trace(), run.attention()
    for bins in (40, 160, 512):
        f = attnview.heatmap_frame(
            trace, store, 5, 1, None, attnview.Window.clamp(None, None, trace.prompt_len + 5, bins)
        )
        assert len(f) <= bins * (bins + 1) // 2 + bins + 1  # the prompt's edge may add one cell per axis
        assert f["q1"].max() == trace.prompt_len + 5 and f["is_step"].any()
    short = Run(tiny_llama, GenerationConfig(model="x", max_new_tokens=4, min_new_tokens=4), attention_dtype="float32")
    for _ in short:
        pass
    st, t = short.attention(), short.prompt_len
    f = attnview.heatmap_frame(short.trace(), st, 3, 0, 2)
    want = eager_attentions(tiny_llama, short.ids[:, : t + 3])[0, 2]
    got = np.zeros_like(want)
    got[f["q0"], f["k0"]] = f["weight"]
    np.testing.assert_allclose(got, np.tril(want), atol=1e-5)


def test_generated_rows_keep_their_mass_when_binned(pooled):
    run, _ = pooled
    trace, store = run.trace(), run.attention()
    row = attnview.row_frame(trace, store, 4, 0, None, max_bins=50)
    assert len(row) <= 51 and abs(row["weight"].sum() - 1) < 1e-3
    snaps = attnview.snapshot_frame(trace, max_rows=2, max_bins=30)
    assert snaps["step"].nunique() <= 2 and len(snaps) <= 2 * 31


def _write_v1(run, folder):
    """A schema-1 pair as earlier versions wrote it: full float16 prompt matrix as byte planes in an npz."""
    lm, t = run.loaded, run.prompt_len
    full = eager_attentions(lm, run.ids[:, : t + run.n - 1])
    prompt = full[:, :, :t, :t].astype(np.float16)
    rows = [full[:, :, t + s - 1, : t + s].astype(np.float16) for s in range(run.n)]
    planes = lambda a: np.ascontiguousarray(a, np.float16).view(np.uint8).reshape(-1, 2).T.copy()  # noqa: E731
    buf = io.BytesIO()
    lengths = np.array([r.shape[-1] for r in rows], dtype=np.int64)
    np.savez_compressed(buf, prompt=planes(prompt), rows=planes(np.concatenate(rows, -1)), lengths=lengths)
    (folder / "trace.attn.npz").write_bytes(buf.getvalue())
    data = json.loads(run.trace().model_dump_json())
    data["schema_version"] = 1
    data["attention"] = {k: v for k, v in data["attention"].items() if k != "prompt_cells"}
    data["attention"]["file"] = "trace.attn.npz"
    (folder / "trace.json").write_text(json.dumps(data))
    return prompt, rows


def test_schema_1_traces_open_and_convert(tiny_llama, tmp_path):
    run = Run(tiny_llama, GenerationConfig(model="x", max_new_tokens=5, min_new_tokens=5))
    for _ in run:
        pass
    prompt, rows = _write_v1(run, tmp_path)
    trace, store = tracefile.load(tmp_path / "trace.json")
    assert trace.schema_version == 2 and store.steps == 5 and store.exact_prompt
    np.testing.assert_allclose(store.row_all(4), rows[4].astype(np.float32), atol=1e-3)
    np.testing.assert_allclose(store.prompt_cells(1, 3), prompt[1, 3].astype(np.float32), atol=1e-3)
    again = tracefile.save(trace, store, tmp_path / "trace.json")  # saving converts the folder for good
    assert not (tmp_path / "trace.attn.npz").exists() and tracefile.load(again)[1].steps == 5


def test_a_save_killed_between_the_pair_keeps_the_old_pair(tiny_llama, tmp_path, monkeypatch):
    first = Run(tiny_llama, GenerationConfig(model="x", max_new_tokens=3, min_new_tokens=3, seed=1))
    second = Run(tiny_llama, GenerationConfig(model="x", max_new_tokens=4, min_new_tokens=4, seed=2))
    for r in (first, second):
        for _ in r:
            pass
    path = tracefile.save(first.trace(), first.attention(), tmp_path / "trace.json")
    real = tracefile._atomic_write

    def die_on_json(target, data):
        if target.name == "trace.json":
            raise KeyboardInterrupt  # killed after the new companion, before the new trace.json
        real(target, data)

    monkeypatch.setattr(tracefile, "_atomic_write", die_on_json)
    with pytest.raises(KeyboardInterrupt):
        tracefile.save(second.trace(), second.attention(), path)
    trace, store = tracefile.load(path)
    assert len(trace.steps) == 3 and store.steps == 3  # the old pair, intact
    monkeypatch.setattr(tracefile, "_atomic_write", real)
    tracefile.save(second.trace(), second.attention(), path)
    assert len(list(tmp_path.glob("*.attn.safetensors"))) == 1  # the orphan is cleaned by the next save
    assert tracefile.load(path)[1].steps == 4


def test_full_disk_stops_the_run_with_a_message_and_a_valid_trace(tiny_llama, tmp_path, monkeypatch):
    run = Run(tiny_llama, GenerationConfig(model="x", max_new_tokens=10, min_new_tokens=10))
    writes = {"n": 0}
    real = run.recorder.writer.write_row

    def fill_up(row):
        writes["n"] += 1
        if writes["n"] == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(row)

    monkeypatch.setattr(run.recorder.writer, "write_row", fill_up)
    for _ in run:
        pass
    assert run.stop_reason == "interrupted" and "No space left on device" in run.error and len(run.steps) == 3
    path = tracefile.save(run.trace(), run.attention(), tmp_path / "trace.json")
    assert tracefile.load(path)[1].steps == 3


def test_limits_refuse_before_the_run(tiny_llama, tiny_llama_long):
    with pytest.raises(ValueError, match="EXPLORER_ATTENTION_BUDGET_MB"):
        Run(tiny_llama_long, GenerationConfig(model="x", prompt=LONG_PROMPT, chat=False), Limits(attention_budget_mb=1))
    with pytest.raises(ValueError, match=r"can attend to \(512\)"):
        Run(tiny_llama, GenerationConfig(model="x", prompt=LONG_PROMPT, chat=False))
    with pytest.raises(ValueError, match="stop_on is 1,001 characters"):
        GenerationConfig(stop_on="x" * 1001)
    hosted = Limits(hosted=True, max_prompt_tokens=1024, max_new_tokens=512, attention_budget_mb=600)
    cost_ok = hosted.check_run(GenerationConfig(max_new_tokens=256), 1024, 30, 9)  # the hosted envelope fits
    assert cost_ok is None


def test_cli_long_prompt_from_file_writes_every_promised_artifact(tiny_llama_long, tmp_path, capsys):
    (tmp_path / "prompt.txt").write_text(LONG_PROMPT, encoding="utf-8")
    out = tmp_path / "run"
    code = cli_main(
        [
            "--model",
            str(tiny_llama_long.source.location),
            "--prompt_file",
            str(tmp_path / "prompt.txt"),
            "--chat",
            "false",
        ]
        + ["--max_new_tokens", "12", "--min_new_tokens", "12", "--attn_every", "5", "--out_dir", str(out), "-q"]
    )
    assert code == 0, capsys.readouterr().err
    assert "warning" not in capsys.readouterr().err
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == [
        "attn_step_0000.png",
        "attn_step_0005.png",
        "attn_step_0010.png",
        "final_step_token_probs.png",
        "prompt_attention_heatmap.png",
        "timeline.png",
    ]
    trace, store = tracefile.load(out / "trace.json")
    assert trace.prompt_len > 1000 and store.steps == 12 and not list(out.glob(".*"))


def test_capture_is_per_thread_and_off_without_a_sink(tiny_llama):
    """The shared model computes plain sdpa for everyone else while one run records."""
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.inference_mode():
        plain = tiny_llama.model(ids).logits
    run = Run(tiny_llama, GenerationConfig(model="x", max_new_tokens=2, min_new_tokens=2))
    for _ in run:
        with torch.inference_mode():
            np.testing.assert_allclose(tiny_llama.model(ids).logits, plain, atol=1e-6)
    assert run.attention().steps == 2


def test_unfinished_file_cannot_be_opened_but_its_reader_works(tiny_llama):
    run = Run(tiny_llama, GenerationConfig(model="x", max_new_tokens=3, min_new_tokens=3))
    for _ in run:
        pass
    with pytest.raises(AttentionFileError, match="was not finished"):
        open_store(run.recorder.writer.path)
    assert run.attention().row(2, 0, None).shape == (run.prompt_len + 2,)

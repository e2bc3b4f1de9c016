"""Admission (admission.py): every file is built here, small on disk and large in what it declares; each
is refused before its declared sizes drive any work, or admitted and then bounded."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from explorer_core import admission, tracefile
from explorer_core.attnstore import FORMAT
from explorer_core.trace import TraceError, dumps
from tests import crafted

ROOT = Path(__file__).resolve().parents[1]


def _header_file(path: Path, header, data: bytes = b"") -> Path:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


def _pair(tmp_path: Path, steps: int = 3) -> tuple[Path, Path]:
    path = crafted.saved_pair(tmp_path, crafted.trace(8, steps, layers=2, heads=2))
    return path, tmp_path / "trace.crafted.attn.safetensors"


def _meta(**over) -> dict:
    meta = {"format": FORMAT, "layers": "2", "heads": "2", "prompt_len": "8", "bins": "8", "steps": "3"}
    meta["dtype"] = "float16"
    return {"__metadata__": meta | over}


@pytest.mark.parametrize(
    "header",
    [
        _meta(steps=str(10**12)),  # drove a loop over every claimed step: 2.7 GiB in 33 s
        _meta(steps="1" * 5000),  # a count too long to parse
        _meta(steps="4000"),  # within the schema's bounds, but not this trace's 3 steps
        _meta(layers="1024", heads="1024"),
        b"[" * 1_000_000 + b"]" * 1_000_000,  # nesting a million deep
        _meta() | {"prompt_bins": "a string"},
        json.dumps(_meta()).encode()[:-1] + b', "prompt_bins": {"data_offsets": [0, ' + b"9" * 5000 + b"]}}",
        b'{"__metadata__": ' + b"1" * 5000 + b"}",  # a 5,000-digit number in the header
    ],
    ids=["steps-1e12", "steps-5000-digits", "steps-of-another-run", "1024x1024", "deep", "string-entry",
         "huge-offset", "huge-number"],
)  # fmt: skip
def test_companion_headers_are_refused_before_any_work(tmp_path, header):
    path, comp = _pair(tmp_path)
    _header_file(comp, header)
    start = time.perf_counter()
    with pytest.raises(TraceError):
        tracefile.load(path)
    assert time.perf_counter() - start < 5  # a claimed size drove no loop (the test of old code never ended)


def _rewrite_weights(comp: Path, value: float) -> None:
    """Put `value` in the first weight of the companion's data, keeping its header."""
    raw = bytearray(comp.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    raw[8 + n : 8 + n + 2] = np.float16(value).tobytes()
    comp.write_bytes(bytes(raw))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -0.5, 3.0])
def test_weights_that_are_not_probabilities_are_refused(tmp_path, value):
    path, comp = _pair(tmp_path)
    _rewrite_weights(comp, value)
    with pytest.raises(TraceError, match="outside \\[0, 1\\] or not finite"):
        tracefile.load(path)


def test_companion_of_another_run_of_the_same_shape_is_refused(tiny_llama, tmp_path):
    from explorer_core.config import GenerationConfig
    from explorer_core.stepper import Run

    paths = []
    for name in ("a", "b"):  # two runs of one shape: only the run id tells their companions apart
        run = Run(tiny_llama, GenerationConfig(model="x", max_new_tokens=3, min_new_tokens=3))
        for _ in run:
            pass
        paths.append(tracefile.save(run.trace(), run.attention(), tmp_path / name / "trace.json"))
    a, b = (tracefile.load(p) for p in paths)
    assert a[0].attention.run == a[1].run != b[1].run
    b[1].path.replace(a[1].path)
    with pytest.raises(TraceError, match="belongs to another run"):
        tracefile.load(paths[0])


def test_links_pipes_and_devices_are_refused_at_once(tmp_path):
    path, comp = _pair(tmp_path)
    link = tmp_path / "zero" / "trace.json"
    link.parent.mkdir()
    link.symlink_to("/dev/zero")
    fifo = tmp_path / "fifo" / "trace.json"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    for bad in (link, fifo):
        with pytest.raises(TraceError, match="not a regular file"):
            tracefile.load(bad)
    comp.unlink()
    comp.symlink_to("/dev/zero")  # a companion that links anywhere is refused too
    with pytest.raises(TraceError, match="not a regular file"):
        tracefile.load(path)


@pytest.mark.parametrize(
    ("layers", "width", "step", "reason"),
    [(2, 100_000, 0, "equal head rows"), (3, None, 0, "2 layers"), (2, None, 9, "does not hold")],
)
def test_kept_explanations_have_the_model_shape(layers, width, step, reason):
    tr = crafted.trace(8, 3, layers=2, heads=2)
    bad = tr.model_copy(update={"explanations": [crafted.explanation(layers, 2, width=width, step=step)]})
    with pytest.raises(TraceError, match=reason):
        admission.admit_trace(bad.model_dump_json())
    good = tr.model_copy(update={"explanations": [crafted.explanation(2, 2)]})
    assert admission.admit_trace(dumps(good)).explanations[0].components.heads == [[0.0, 0.0]] * 2


def _integral_floats_as_ints(obj):
    if isinstance(obj, dict):
        return {k: _integral_floats_as_ints(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_integral_floats_as_ints(v) for v in obj]
    return int(obj) if isinstance(obj, float) and obj.is_integer() else obj


def test_a_file_that_would_grow_when_written_back_is_refused(monkeypatch):
    """Spelled short ("1" for 1.0), a file under the cap is written back longer: refused when admitted,
    never at the download button later."""
    tr = crafted.trace(16, 200, snapshots=True)
    short = json.dumps(_integral_floats_as_ints(json.loads(tr.model_dump_json())), separators=(",", ":"))
    monkeypatch.setattr(admission, "MAX_TRACE_BYTES", len(short) + 10)
    assert len(tr.model_dump_json()) > len(short) + 10
    with pytest.raises(TraceError, match="written back takes"):
        admission.admit_trace(short)
    monkeypatch.setattr(admission, "MAX_TRACE_BYTES", len(tr.model_dump_json()))
    assert len(dumps(admission.admit_trace(short))) <= admission.MAX_TRACE_BYTES


# -- schema 1 --------------------------------------------------------------------------------------
def v1_pair(folder: Path, layers: int, heads: int, t: int, steps: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    crafted.write_v1(folder / "trace.attn.npz", layers, heads, t, steps)
    data = json.loads(crafted.trace(t, steps, layers=layers, heads=heads).model_dump_json())
    data["schema_version"] = 1
    data["attention"] = {k: v for k, v in data["attention"].items() if k not in ("prompt_cells", "run")}
    data["attention"]["file"] = "trace.attn.npz"
    (folder / "trace.json").write_text(json.dumps(data))
    return folder / "trace.json"


def test_schema_1_conversion_is_streamed_and_correct(tmp_path):
    """8,192-token prompt: 128 MiB of float16 inflated and pooled into 1,024 cells per axis. Converted
    in a fresh process whose peak memory is measured; the cells and rows are checked against the rule
    the file was made by."""
    path = v1_pair(tmp_path, layers=1, heads=2, t=8192, steps=3)
    assert path.with_name("trace.attn.npz").stat().st_size < 3 * 2**20
    script = textwrap.dedent(f"""
        import re
        from explorer_core import tracefile
        hwm = lambda: int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) // 1024
        before = hwm()
        trace, store = tracefile.load({str(path)!r})
        print(hwm() - before, store.shape.bins)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    grew_mb, bins = map(int, out.stdout.split())
    assert bins == 1024 and grew_mb < 150  # the whole-matrix conversion took 6.4 GiB on a file like this
    trace, store = tracefile.load(path)  # converted again, in this process, to read the result
    q = np.arange(8192)
    want = np.add.reduceat(((q % 7) / 8).astype(np.float16).astype(np.float32), store.edges()[:-1]) / 8
    np.testing.assert_allclose(store.prompt_cells(0, 1)[:, 5], want, rtol=1e-3)
    for s in range(3):
        for layer_head in range(2):
            assert np.allclose(store.row(s, 0, layer_head), ((layer_head * 3 + s) % 97) / 128)


def test_schema_1_conversion_over_the_new_run_budget_is_refused_before_inflating(tmp_path, monkeypatch):
    path = v1_pair(tmp_path, layers=2, heads=2, t=300, steps=2)
    monkeypatch.setenv("EXPLORER_ATTENTION_BUDGET_MB", "0")
    with pytest.raises(TraceError, match="over the budget of 0 MB a new run gets"):
        tracefile.load(path)


def test_a_companion_over_the_recording_budget_is_refused_before_it_is_opened(tmp_path, monkeypatch):
    path, comp = _pair(tmp_path)
    monkeypatch.setenv("EXPLORER_ATTENTION_BUDGET_MB", "0")
    comp.write_bytes(b"never read")  # refused from the trace's declared shape alone
    with pytest.raises(TraceError, match="over the budget of 0 MB a run may record here"):
        tracefile.load(path)


def _doors(path: Path):
    """Every way a trace on disk or in an upload comes in: each must refuse the same file in words."""
    import io

    from explorer_core import cli, notebook
    from explorer_ui import loading

    def zipped():
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for p in path.parent.iterdir():
                zf.write(p, p.name)
        return loading.from_zip(buf.getvalue())

    return {
        "tracefile.load": lambda: tracefile.load(path),
        "Trace.load": lambda: notebook.Trace.load(path),
        "zip upload": zipped,
        "replay": lambda: cli.main(["replay", str(path)]),
        "explain": lambda: cli.main(["explain", str(path), "--step", "0"]),
    }


def test_every_door_refuses_a_companion_claiming_a_trillion_steps(tmp_path, capsys):
    path, comp = _pair(tmp_path)
    _header_file(comp, _meta(steps=str(10**12)))
    for door, call in _doors(path).items():
        try:
            code = call()
        except TraceError as exc:
            assert "not a count" in str(exc), door
        else:  # the command line says it in one line and exits non-zero
            assert code != 0 and "not a count" in capsys.readouterr().err, door


def test_a_converted_schema_1_copy_is_removed_with_its_store(tmp_path):
    import gc

    path = v1_pair(tmp_path, layers=1, heads=1, t=20, steps=2)
    _, store = tracefile.load(path)
    folder = store.path.parent
    assert folder.name.startswith("explorer-load-") and folder.is_dir()
    del store
    gc.collect()
    assert not folder.exists()
    bad = v1_pair(tmp_path / "bad", layers=1, heads=1, t=20, steps=2)
    crafted.write_v1(bad.with_name("trace.attn.npz"), 1, 1, 3, 1)  # another shape: refused
    before = set(Path(tempfile.gettempdir()).glob("explorer-load-*"))
    with pytest.raises(TraceError):
        tracefile.load(bad)
    assert set(Path(tempfile.gettempdir()).glob("explorer-load-*")) == before  # a failed conversion leaves nothing


def test_a_branch_stops_before_its_trace_would_pass_the_cap(tiny_llama, monkeypatch):
    """The trace a branch joins has little room left: the branch keeps the steps that fit, says why it
    stopped, and the trace with it still saves."""
    from explorer_core.config import GenerationConfig
    from explorer_core.stepper import TRACE_SLACK, Run

    cfg = GenerationConfig(model="x", max_new_tokens=40, min_new_tokens=40)
    run = Run(tiny_llama, cfg)
    for _ in run:
        pass
    tr = run.trace()
    per_step = len(tr.steps[0].model_dump_json())
    monkeypatch.setattr(admission, "MAX_TRACE_BYTES", len(tr.model_dump_json()) + TRACE_SLACK + 5 * per_step)
    child = Run.branch(tiny_llama, cfg, [s.token_id for s in tr.steps[:3]], 5, room=admission.room(tr))
    for _ in child:
        pass
    assert 0 < len(child.steps) < 37 and "past its" in child.error
    joined = tr.model_copy(update={"branches": [child.branch_record(1, 0)]})
    assert len(dumps(joined)) <= admission.MAX_TRACE_BYTES

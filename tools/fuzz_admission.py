"""Structure fuzzer for admission: small files with large declared sizes, deep nesting, wrong types and
special files, each sent through the doors a trace comes in by and, when admitted, through every view.

A worker process (`python -m tools.fuzz_admission --worker`) imports everything once, caps its own
address space (RLIMIT_AS) at what it had plus a budget, and then reads one folder per line on stdin.
For each it resets its peak-memory mark (/proc/self/clear_refs), opens the folder as Saved runs and the
notebook do (`tracefile.load`), uploads its regular files to the Trace viewer (AppTest: every tab of the
page is drawn), and, for an admitted trace, builds the downloads, the one-file export and the notebook's
inline view. It answers one JSON line: refused or admitted, what was said, the seconds and the peak
memory above the worker's own. `tests/test_fuzz_admission.py` generates the files with hypothesis;
`python -m tools.fuzz_admission --report N` runs N of them and prints RELIABILITY.md's table.
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AS_BUDGET = 4 * 2**30  # address space the worker may add to what it holds after its imports
PEAK_BUDGET_MB = 1024  # resident memory one file may add (the hosted app runs at about 1.4 GB of 2.7)
COMPANION_KINDS = (
    "none", "honest", "meta-lie", "string-entry", "deep", "truncated", "values", "link-zero", "fifo", "v1", "v1-lie",
)  # fmt: skip
TRACE_MUTATIONS = ("none", "deep", "wrong-type", "short-floats", "huge-int", "explain-wide")
LIES = (10**12, "1" * 5000, -1, "x", 0, 4096, 1024, None, [1], {"a": 1})


# -- building a file from a spec --------------------------------------------------------------------
def build(spec: dict, folder: Path) -> None:
    """trace.json and (per spec["companion"]) a companion in `folder`, built now."""
    from tests import crafted

    folder.mkdir(parents=True, exist_ok=True)
    tr = _trace(spec)
    kind = spec["companion"]
    name = {"v1": "trace.attn.npz", "v1-lie": "trace.attn.npz"}.get(kind, "trace.crafted.attn.safetensors")
    if kind == "none":
        tr = tr.model_copy(update={"attention": None})
    else:
        tr = tr.model_copy(update={"attention": tr.attention.model_copy(update={"file": name})})
    data = json.loads(tr.model_dump_json())
    if kind.startswith("v1"):
        data["schema_version"] = 1
        data["attention"] = {k: v for k, v in data["attention"].items() if k not in ("prompt_cells", "run")}
    (folder / "trace.json").write_bytes(_mutate(data, spec))
    comp = folder / name
    if kind == "honest" or kind in ("truncated", "values"):
        crafted.companion(comp, tr)
        if kind == "truncated":
            os.truncate(comp, comp.stat().st_size - 3)
        elif kind == "values":
            raw = bytearray(comp.read_bytes())
            raw[-2:] = b"\x00\x7e"  # a NaN in the last weight
            comp.write_bytes(bytes(raw))
    elif kind == "v1":
        a = tr.attention
        crafted.write_v1(comp, a.layers, a.heads, tr.prompt_len, len(tr.steps))
    elif kind == "v1-lie":
        crafted.write_v1(comp, 1, 1, 2, 1)  # honest headers of another shape
    elif kind == "link-zero":
        comp.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(comp)
    elif kind != "none":
        _lying_header(comp, tr, kind, spec)


def _trace(spec: dict):
    from explorer_core.trace import Branch, LensRecord
    from tests import crafted

    t, n, layers, heads = spec["prompt_len"], spec["steps"], spec["layers"], spec["heads"]
    cells = min(t, 1024, max(1, int((40 * 2**20 / (layers * heads * 2)) ** 0.5)))
    tr = crafted.trace(t, n, layers=layers, heads=heads, snapshots=spec["snapshots"], cells=cells)
    if spec["lens"]:
        lens = LensRecord(top_ids=[1] * layers, top_labels=["a"] * layers, top_probs=[0.5] * layers,
                          chosen_probs=[0.5] * layers)  # fmt: skip
        tr = tr.model_copy(update={"steps": [s.model_copy(update={"lens": lens}) for s in tr.steps]})
    branches, end = [], n
    for k in range(1, spec["branches"] + 1 if n else 1):  # chained, each splitting at its parent's last step
        at = max(0, end - 1)
        own = [crafted._step(at + j, t, False) for j in range(2)]
        branches.append(Branch(id=k, parent=k - 1, at_step=at, steps=own, stop_reason="max_new_tokens",
                               output_text="ab"))  # fmt: skip
        end = at + 2
    tr = tr.model_copy(update={"branches": branches})
    if spec["explanations"] and n:
        tr = tr.model_copy(
            update={
                "explanations": [
                    crafted.explanation(layers, heads, 1.0 / (layers * heads), methods={"grad_x_input": [1.0]})
                ]
                * spec["explanations"]
            }
        )
    return tr


def _mutate(data: dict, spec: dict) -> bytes:
    how = spec["trace_mutation"]
    if how == "deep":
        data["output_text"] = "NEST"
        text = json.dumps(data).replace('"NEST"', "[" * 200_000 + "]" * 200_000)
        return text.encode()
    if how == "wrong-type":
        data[spec["field"]] = spec["lie"]
    elif how == "huge-int":
        return json.dumps(data).replace('"n_heads": ', '"n_heads": ' + "9" * 5000 + ', "x": ').encode()
    elif how == "short-floats":
        data = _short(data)
    elif how == "explain-wide" and data.get("explanations"):
        data["explanations"][0]["components"]["heads"][0] = [0.0] * 100_000
    return json.dumps(data, separators=(",", ":")).encode()


def _short(obj):
    if isinstance(obj, dict):
        return {k: _short(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_short(v) for v in obj]
    return int(obj) if isinstance(obj, float) and obj.is_integer() else obj


def _lying_header(path: Path, tr, kind: str, spec: dict) -> None:
    import struct

    from explorer_core.attnstore import FORMAT

    a = tr.attention
    meta = {"format": FORMAT, "layers": str(a.layers), "heads": str(a.heads), "prompt_len": str(tr.prompt_len),
            "bins": str(a.prompt_cells), "steps": str(len(tr.steps)), "dtype": "float16"}  # fmt: skip
    header: object = {"__metadata__": meta}
    if kind == "meta-lie":
        meta[spec["field_meta"]] = spec["lie"]
    elif kind == "string-entry":
        header = {"__metadata__": meta, "prompt_bins": "x", "prompt_edges": 1}
    elif kind == "deep":
        header = json.loads("[" * 50 + "]" * 50)
        body = b"[" * 1_000_000 + b"]" * 1_000_000
        path.write_bytes(struct.pack("<Q", len(body)) + body)
        return
    body = json.dumps(header, default=str).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + b"\0" * 64)


# -- the worker -------------------------------------------------------------------------------------
def _status(key: str) -> int:
    with open("/proc/self/status") as fh:
        return int(re.search(rf"{key}:\s+(\d+)", fh.read()).group(1)) * 1024


class Probe:
    """Holds one AppTest of the Trace viewer and sends each folder through every door."""

    def __init__(self) -> None:
        self.at = None

    def _viewer(self):
        from streamlit.testing.v1 import AppTest

        if self.at is None or self.at.exception:
            self.at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
            self.at.run()
            self.at.switch_page("pages/viewer.py")
            self.at.session_state["viewer_source_kept"] = "Upload"
            self.at.run()
        return self.at

    def run(self, folder: Path) -> dict:
        from explorer_core import tracefile
        from explorer_core.trace import TraceError

        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # the peak mark starts again from what is resident now
        base, start = _status("VmRSS"), time.perf_counter()
        out: dict = {"errors": []}
        try:
            trace, store = tracefile.load(folder / "trace.json")
            out |= {"outcome": "admitted", "said": ""} | self._outputs(trace, store)
        except TraceError as exc:
            out |= {"outcome": "refused", "said": str(exc)[:300]}
        except Exception as exc:  # noqa: BLE001 - the fuzzer reports what escaped instead of stopping
            out |= {"outcome": "crashed", "said": f"{type(exc).__name__}: {str(exc)[:300]}"}
        out |= self._upload(folder)
        out["seconds"] = round(time.perf_counter() - start, 2)
        out["peak_mb"] = round((_status("VmHWM") - base) / 2**20, 1)
        return out

    def _outputs(self, trace, store) -> dict:
        from explorer_core import export_html, notebook
        from explorer_core.trace import dumps
        from explorer_ui.views import archive_bytes

        sizes = {"json": len(dumps(trace)), "zip": len(archive_bytes(trace, store))}
        sizes["export"] = len(export_html.build(trace, store, vega_js=""))
        sizes["notebook"] = len(notebook.attach(trace, store)._repr_html_())
        return {"sizes": sizes}

    def _upload(self, folder: Path) -> dict:
        files = [p for p in sorted(folder.iterdir()) if p.is_file() and not p.is_symlink()]
        at = self._viewer()
        up = [(p.name, p.read_bytes(), "application/octet-stream") for p in files]
        at.file_uploader(key="viewer_upload").set_value(up).run()
        said = [e.value for e in at.error] + [t.value for t in at.text if at.error]
        return {"upload_exception": [str(e.value)[:300] for e in at.exception], "upload_said": said[:3]}


def worker() -> None:
    """Read folders from stdin, answer one `RESULT {json}` line each, within the address-space cap."""
    import explorer_core.export_html  # noqa: F401 - imports happen before the cap is set
    import explorer_ui.views  # noqa: F401

    probe = Probe()
    probe._viewer()
    vm = _status("VmSize")
    resource.setrlimit(resource.RLIMIT_AS, (vm + AS_BUDGET, resource.RLIM_INFINITY))
    print("READY", flush=True)
    for line in sys.stdin:
        print("RESULT " + json.dumps(probe.run(Path(line.strip()))), flush=True)


def start_worker() -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", MALLOC_ARENA_MAX="2", EXPLORER_HOSTED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tools.fuzz_admission", "--worker"],
        cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    for line in proc.stdout:
        if line.startswith("READY"):
            return proc
    raise RuntimeError("the fuzz worker did not start")


def ask(proc: subprocess.Popen, folder: Path) -> dict:
    proc.stdin.write(f"{folder}\n")
    proc.stdin.flush()
    for line in proc.stdout:
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"the fuzz worker died on {folder} (memory cap or crash)")


# -- the report ------------------------------------------------------------------------------------
def run_logged(examples: int, log: Path) -> None:
    """Run the fuzz test with `examples` files, keeping every result line in `log`."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", EXPLORER_FUZZ_EXAMPLES=str(examples), EXPLORER_FUZZ_LOG=str(log))
    test = "tests/test_fuzz_admission.py"
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], cwd=ROOT, env=env, check=True
    )


def table(log: Path) -> str:
    """RELIABILITY.md's section from a log: what was tried, what was said, the largest cost."""
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    admitted = [r for r in rows if r["result"]["outcome"] == "admitted"]
    refused = [r for r in rows if r["result"]["outcome"] == "refused"]
    worst = lambda group, key: max((r["result"][key] for r in group), default=0)  # noqa: E731
    by = {"companion": {}, "trace_mutation": {}}
    for r in rows:
        for field, counts in by.items():
            counts.setdefault(r["spec"][field], [0, 0])[r["result"]["outcome"] != "admitted"] += 1
    lines = [
        "## Admission fuzzer",
        "",
        f"`python -m tools.reliability_report` ran {len(rows)} files made by the structure fuzzer "
        "(`tests/test_fuzz_admission.py`, `tools/fuzz_admission.py`; CI runs 40): declared prompts of 1 to 8,192 "
        "tokens, 0 to 400 steps, 1 to 1,024 layers and heads, 0 to 64 chained branches and kept explanations, "
        "companions honest, lying in one metadata field, with string entries, nested a million deep, truncated, "
        "holding a NaN, linked to /dev/zero, FIFOs, schema-1 npz honest or of another shape; trace.json nested, "
        "with a field of the wrong type, a 5,000-digit number, numbers spelled short, or an explanation row of "
        "100,000 heads. Each went through `tracefile.load` and the Trace viewer upload (AppTest) in a worker whose "
        f"address space was capped at its own plus {AS_BUDGET / 2**30:.0f} GiB; each admitted file then through the "
        "downloads, the one-file export and the notebook view.",
        "",
        f"- refused with a sentence: {len(refused)}; admitted: {len(admitted)}; anything else (an exception, "
        f"an error after admission, a worker killed): {len(rows) - len(refused) - len(admitted)}",
        f"- largest cost of an admitted file: {worst(admitted, 'peak_mb'):,.0f} MB above the worker, "
        f"{worst(admitted, 'seconds'):.1f} s (every door and every output); of a refused one: "
        f"{worst(refused, 'peak_mb'):,.0f} MB, {worst(refused, 'seconds'):.1f} s",
        "",
        "| companion | admitted | refused | | trace.json | admitted | refused |",
        "|---|---|---|---|---|---|---|",
    ]
    left, right = sorted(by["companion"].items()), sorted(by["trace_mutation"].items())
    for i in range(max(len(left), len(right))):
        a = f"{left[i][0]} | {left[i][1][0]} | {left[i][1][1]}" if i < len(left) else " | | "
        b = f"{right[i][0]} | {right[i][1][0]} | {right[i][1][1]}" if i < len(right) else " | | "
        lines.append(f"| {a} | | {b} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker()

"""Bounded cost: each crafted file uploaded to the Trace viewer in a process of its own (AppTest), with
the process's memory and time measured around the upload. Used by the watchdog test and RELIABILITY.md.

`python -m tools.bounded_cost CASE` runs one case and prints one JSON line; `cases()` names them all.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "8,192-token prompt, 1 layer × 1 head companion": "long_prompt",
    "2,300 steps, each with a snapshot row": "snapshots",
    "1,024 heads × 256 positions (Heads page)": "many_heads",
    "zip whose directory claims 1 KB for a member that inflates to 400 MB": "lying_zip",
}


def _files(case: str, folder: Path) -> list[tuple[str, bytes, str]]:
    """The upload for one case, made now (nothing large is stored in the repository)."""
    from tests import crafted

    if case == "long_prompt":
        path = crafted.saved_pair(folder, crafted.trace(8192, 2, cells=1024))
    elif case == "snapshots":
        path = folder / "trace.json"
        from explorer_core.trace import dumps

        tr = crafted.trace(4, 2300, snapshots=True)
        path.write_text(dumps(tr.model_copy(update={"attention": None})), encoding="utf-8")
        return [("trace.json", path.read_bytes(), "application/json")]
    elif case == "many_heads":
        path = crafted.saved_pair(folder, crafted.trace(256, 2, layers=1, heads=1024, cells=64))
    elif case == "lying_zip":
        return [("trace.zip", _lying_zip(folder), "application/zip")]
    else:
        raise SystemExit(f"unknown case {case!r}: use one of {', '.join(CASES.values())}")
    comp = next(folder.glob("*.attn.safetensors"))
    return [
        ("trace.json", path.read_bytes(), "application/json"),
        (comp.name, comp.read_bytes(), "application/octet-stream"),
    ]


def _lying_zip(folder: Path) -> bytes:
    """A valid trace plus a 400 MB member of zeros whose local and central headers claim 1,024 bytes."""
    from tests import crafted

    path = crafted.saved_pair(folder, crafted.trace(8, 2, cells=8))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("trace.json", path.read_bytes())
        with zf.open("trace.crafted.attn.safetensors", "w", force_zip64=False) as fh:
            zero = bytes(4 * 2**20)
            for _ in range(100):
                fh.write(zero)
    data = bytearray(buf.getvalue())
    real = struct.pack("<I", 400 * 2**20)
    for at in _find_all(data, real):  # every size field that says 400 MB now says 1 KB
        data[at : at + 4] = struct.pack("<I", 1024)
    return bytes(data)


def _find_all(data: bytearray, needle: bytes) -> list[int]:
    out, i = [], data.find(needle)
    while i != -1:
        out.append(i)
        i = data.find(needle, i + 1)
    return out


def run_case(case: str) -> dict:
    """Upload one case to the viewer (and open the Heads page) and measure what it cost."""
    from streamlit.testing.v1 import AppTest

    with tempfile.TemporaryDirectory() as tmp:
        files = _files(case, Path(tmp))
        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
        at.run()
        at.switch_page("pages/viewer.py")
        at.session_state["viewer_source_kept"] = "Upload"
        at.run()
        base = _peak_mb()
        start = time.perf_counter()
        at.file_uploader(key="viewer_upload").set_value(files).run()
        if case == "many_heads":
            at.switch_page("pages/heads.py").run()
        elapsed = time.perf_counter() - start
        errors = [t.value for t in at.text if at.error]  # the plain-text reason under the error box
        charts = at.get("vega_lite_chart")
        rows = sum(len(json.loads(c.proto.spec).get("datasets", {}) or {}) for c in charts)
    return {
        "case": case,
        "exception": bool(at.exception),
        "charts": len(charts),
        "datasets": rows,
        "said": ("refused: " + errors[0])[:200] if errors else "",
        "seconds": round(elapsed, 2),
        "peak_above_app_mb": round(_peak_mb() - base, 1),
    }


def _peak_mb() -> float:
    """This process's own peak RSS (VmHWM). Not ru_maxrss: Linux carries the parent's peak across exec."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM")) / 1024


def measure(case: str, timeout: float = 600) -> dict:
    """Run one case in a child process (its own peak memory) and return its JSON line."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", STREAMLIT_CLIENT_SHOW_ERROR_DETAILS="full")
    done = subprocess.run(
        [sys.executable, "-m", "tools.bounded_cost", case],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode:
        raise RuntimeError(f"case {case} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table() -> str:
    lines = [
        "## Bounded cost",
        "",
        "Each crafted file uploaded to the Trace viewer in its own process (AppTest), measured around the upload. "
        "Written by `python -m tools.reliability_report`; `tests/test_bounded.py` checks the bounds.",
        "",
        "| crafted file | what the app does | charts drawn | seconds | peak memory above the running app |",
        "|---|---|---|---|---|",
    ]
    for title, case in CASES.items():
        r = measure(case)
        did = r["said"].replace("|", "\\|") or (
            "drawn within the cell budget" if r["charts"] else "shown without charts"
        )
        lines.append(f"| {title} | {did} | {r['charts']} | {r['seconds']} | {r['peak_above_app_mb']} MB |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(json.dumps(run_case(sys.argv[1])))

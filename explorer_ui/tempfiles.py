"""Temporary folders of uploads and recordings: owned by one session, gone when it ends.

An upload's companion (`explorer-upload-<pid>-…`) and a run's recording (`explorer-run-<pid>-…`) live in
the system's temporary folder. Each session keeps the folders it made in a `Folders` object held in its
session state; `weakref.finalize` removes them when that state is dropped (Streamlit forgets a closed
session's state) and, for sessions still open, when the server process exits. A process that died
without exiting cleanly leaves its folders behind: `sweep_stale` removes those at the next start, by
the owner pid written into each folder's name.

Two bounds keep a host's disk in check: this server's temporary folders together stay under
EXPLORER_TEMP_MB (a new upload or recording is refused past it), and the "Recent runs" folder (each
finished app run's trace pair, so a reload loses nothing) keeps the newest EXPLORER_RECENT_RUNS runs
within EXPLORER_RECENT_MB, oldest removed first.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
import time
import weakref
from pathlib import Path

import streamlit as st

from explorer_core import trace as trace_io
from explorer_core.limits import Limits, _env_int
from explorer_core.recorder import TEMP_PREFIX

UPLOAD_PREFIX = "explorer-upload-"
PREFIXES = (UPLOAD_PREFIX, TEMP_PREFIX)
KEY = "_explorer_temp_folders"  # session state entry holding the session's Folders
STALE_S = 2 * 3600  # a dead owner's folder younger than this is kept (its pid may be another machine's)


def new_folder(prefix: str) -> Path:
    """A fresh folder named `<prefix><pid>-<random>`: the pid lets a later start find folders of dead processes.
    Refused (ValueError) while this server's folders already hold more than the cap."""
    check_room()
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-"))


def temp_cap_mb() -> int:
    """EXPLORER_TEMP_MB: what this server's uploads and recordings may hold in the temporary folder (0: no cap)."""
    return _env_int("EXPLORER_TEMP_MB", 4096 if Limits.from_env().hosted else 0)


def _size(folder: str | os.PathLike) -> int:
    total = 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                continue
    return total


def server_usage(root: str | os.PathLike | None = None) -> int:
    """Bytes held by this server's own temporary folders (named with its pid)."""
    root = Path(root or tempfile.gettempdir())
    try:
        entries = list(os.scandir(root))
    except OSError:
        return 0
    return sum(_size(e.path) for e in entries if _owner(e.name) == os.getpid() and e.is_dir(follow_symlinks=False))


def check_room(root: str | os.PathLike | None = None) -> None:
    cap = temp_cap_mb()
    if cap <= 0:
        return
    used = server_usage(root) / 2**20
    if used >= cap:
        raise ValueError(
            f"this server's uploads and recordings already hold {used:,.0f} MB of the temporary folder, "
            f"at its cap EXPLORER_TEMP_MB={cap:,}: try again once other sessions end (their files go with "
            "them), or raise EXPLORER_TEMP_MB"
        )


def ours(folder: str | os.PathLike) -> bool:
    """Only the app's own temporary folders are ever removed here (never an example or a saved run)."""
    p = Path(folder)
    return p.name.startswith(PREFIXES) and p.parent == Path(tempfile.gettempdir())


def _remove(paths: set[str]) -> None:
    for p in list(paths):
        if ours(p):
            shutil.rmtree(p, ignore_errors=True)
    paths.clear()


class Folders:
    """One session's temporary folders, removed when this object goes (with its session) or at exit."""

    def __init__(self) -> None:
        self.paths: set[str] = set()
        # the finalizer holds the set, not self, or the object could never be collected; atexit is on by default
        self._finalizer = weakref.finalize(self, _remove, self.paths)

    def add(self, folder: str | os.PathLike) -> None:
        if ours(folder):
            self.paths.add(str(folder))

    def release(self) -> None:
        """Remove every folder now (the finalizer then has nothing left to do)."""
        self._finalizer()


def session_folders() -> Folders:
    """This session's Folders (made on first use)."""
    if KEY not in st.session_state:
        st.session_state[KEY] = Folders()
    return st.session_state[KEY]


def track(store) -> None:
    """Give the folder behind an attention store (an upload or an app run's recording) to this session."""
    if store is not None:
        session_folders().add(Path(store.path).parent)


def track_folder(folder: str | os.PathLike) -> None:
    session_folders().add(folder)


def _owner(name: str) -> int | None:
    """The pid in `<prefix><pid>-…`; None for folders named before pids were written (left alone)."""
    rest = next((name[len(p) :] for p in PREFIXES if name.startswith(p)), "")
    pid, sep, _ = rest.partition("-")
    return int(pid) if sep and pid.isascii() and pid.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by another user
    return True


def sweep_stale(root: str | os.PathLike | None = None, older_than_s: float = STALE_S) -> list[Path]:
    """Remove app folders under `root` (the temporary folder) whose owner process is gone and that are
    older than `older_than_s`; returns what was removed. Links and plain files are never touched."""
    root = Path(root or tempfile.gettempdir())
    now, removed = time.time(), []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return removed
    for entry in entries:
        pid = _owner(entry.name)
        if pid is None or pid == os.getpid() or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            old = now - entry.stat(follow_symlinks=False).st_mtime > older_than_s
        except OSError:
            continue
        if old and not _alive(pid):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
    return removed


@st.cache_resource(show_spinner=False)
def sweep_once() -> list[Path]:
    """Once per process, at its first page: the folders dead processes left behind."""
    return sweep_stale()


# -- recent runs: a reload (or a closed tab) never loses a finished run ---------------------------------
OWNER = "owner"  # query parameter: whose runs a hosted server lists (a reload keeps the URL, so the owner)


OWNER_KEY = "_explorer_owner"


def owner() -> str:
    """This visitor's token: from the URL when it holds one (a reload keeps the URL), else a new one. A
    hosted server writes it into the URL and lists only the runs made under it."""
    if OWNER_KEY not in st.session_state:
        given = st.query_params.get(OWNER, "")
        ok = len(given) == 16 and all(c in "0123456789abcdef" for c in given)
        st.session_state[OWNER_KEY] = given if ok else secrets.token_hex(8)
    token = st.session_state[OWNER_KEY]
    if Limits.from_env().hosted and st.query_params.get(OWNER) != token:
        st.query_params[OWNER] = token
    return token


def recent_dir() -> Path:
    """EXPLORER_RECENT_DIR, or a folder of this user's beside the recordings: on the same file system, a
    run's companion is hard-linked there, not copied (hundreds of MB on a host)."""
    given = os.environ.get("EXPLORER_RECENT_DIR")
    return Path(given) if given else Path(tempfile.gettempdir()) / f"explorer-recent-{_uid()}"


def _uid() -> str:
    return str(os.getuid()) if hasattr(os, "getuid") else "user"


def recent_bounds() -> tuple[int, int]:
    """(most runs kept, most MB kept); EXPLORER_RECENT_RUNS=0 keeps none."""
    hosted = Limits.from_env().hosted
    return _env_int("EXPLORER_RECENT_RUNS", 5 if hosted else 20), _env_int(
        "EXPLORER_RECENT_MB", 600 if hosted else 2048
    )


def save_recent(trace, store, owner: str, root: Path | None = None) -> Path | None:
    """Keep a finished run's trace.json and companion in the recent-runs folder; the companion is hard-linked
    (no copy) when it can be, and left out when alone it passes the size cap. No Streamlit calls here:
    this also runs while a closing session's script is being stopped."""
    most_runs, most_mb = recent_bounds()
    if most_runs <= 0 or not trace.steps:
        return None
    root = root or recent_dir()
    now = time.time_ns()  # names sort by time, to the nanosecond: the oldest goes first
    final = (
        root / f"{time.strftime('%Y%m%d-%H%M%S', time.localtime(now / 1e9))}-{now % 10**9:09d}-{secrets.token_hex(2)}"
    )
    work = root / f".partial-{final.name}"
    if store is not None and (store.nbytes() > most_mb * 2**20 or not store.finished_on_disk()):
        store = None  # too big alone, or not a complete file (the recorder was not finished)
    name = "trace.attn.safetensors" if store is not None else None
    info = trace.attention.model_copy(update={"file": name}) if trace.attention is not None else None
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        if root.is_symlink() or (hasattr(os, "getuid") and root.stat().st_uid != os.getuid()):
            return None  # not ours (a name someone else made first in a shared temporary folder)
        work.mkdir()
        if name is not None:
            _link_or_copy(store.path, work / name)
        (work / "trace.json").write_text(trace_io.dumps(trace.model_copy(update={"attention": info})), "utf-8")
        meta = {"owner": owner, "model": trace.model.name, "steps": len(trace.steps), "stop": trace.stop_reason}
        (work / "meta.json").write_text(json.dumps(meta), "utf-8")
        os.replace(work, final)
    except (OSError, ValueError):
        shutil.rmtree(work, ignore_errors=True)  # a full disk or a trace over its cap: the run stays on screen
        return None
    prune_recent(root, most_runs, most_mb)
    return final


def recent_label(path: Path, meta: dict) -> str:
    """`2026-12-06 07:48:48 · model · 12 tokens · eos`: the folder's name carries the time."""
    n = path.parent.name
    when = f"{n[:4]}-{n[4:6]}-{n[6:8]} {n[9:11]}:{n[11:13]}:{n[13:15]}"
    return f"{when} · {str(meta.get('model', '?'))[:60]} · {meta.get('steps', '?')} tokens · {meta.get('stop', '?')}"


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # the session's copy goes with its session; this name keeps the data
    except OSError:
        shutil.copyfile(src, dst)


def recent_runs(root: Path | None = None, owner: str | None = None) -> list[tuple[Path, dict]]:
    """Saved runs, newest first, with their meta; only `owner`'s when given."""
    root = root or recent_dir()
    out = []
    try:
        folders = sorted((p for p in root.iterdir() if not p.name.startswith(".")), reverse=True)
    except OSError:
        return out
    for folder in folders:
        try:
            meta = json.loads((folder / "meta.json").read_text("utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and (owner is None or meta.get("owner") == owner):
            out.append((folder / "trace.json", meta))
    return out


def prune_recent(root: Path, most_runs: int, most_mb: int) -> None:
    """Remove the oldest runs past `most_runs`, then past `most_mb` in all (and killed saves' leftovers)."""
    try:
        folders = sorted(root.iterdir(), reverse=True)
    except OSError:
        return
    total, kept = 0, 0
    for folder in folders:
        if not folder.is_dir() or folder.is_symlink():
            continue
        if folder.name.startswith(".partial-"):
            if time.time() - folder.stat().st_mtime > 600:
                shutil.rmtree(folder, ignore_errors=True)
            continue
        total += _size(folder)
        kept += 1
        if kept > most_runs or total > most_mb * 2**20:
            shutil.rmtree(folder, ignore_errors=True)

"""Temporary folders of uploads and recordings: owned by one session, gone when it ends.

An upload's companion (`explorer-upload-<pid>-…`) and a run's recording (`explorer-run-<pid>-…`) live in
the system's temporary folder. Each session keeps the folders it made in a `Folders` object held in its
session state; `weakref.finalize` removes them when that state is dropped (Streamlit forgets a closed
session's state) and, for sessions still open, when the server process exits. A process that died
without exiting cleanly leaves its folders behind: `sweep_stale` removes those at the next start, by
the owner pid written into each folder's name.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import weakref
from pathlib import Path

import streamlit as st

from explorer_core.recorder import TEMP_PREFIX

UPLOAD_PREFIX = "explorer-upload-"
PREFIXES = (UPLOAD_PREFIX, TEMP_PREFIX)
KEY = "_explorer_temp_folders"  # session state entry holding the session's Folders
STALE_S = 2 * 3600  # a dead owner's folder younger than this is kept (its pid may be another machine's)


def new_folder(prefix: str) -> Path:
    """A fresh folder named `<prefix><pid>-<random>`: the pid lets a later start find folders of dead processes."""
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-"))


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

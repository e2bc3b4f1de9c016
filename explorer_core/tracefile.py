"""Saving and loading a trace with its attention companion, committed as a pair.

`save` writes the companion under a fresh name (`trace.<id>.attn.safetensors`), then trace.json
naming it, each by an atomic rename: a kill at any moment leaves either the old pair or the new one,
never a trace.json whose companion was replaced. Leftovers of earlier pairs and of killed saves are
removed once the new trace.json is in place. `load` and `open_companion` go through admission.py,
the one door every trace comes in by.
"""

from __future__ import annotations

import os
import secrets
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl  # advisory locks: saves into one folder take turns, a live writer's files are left alone
except ImportError:  # Windows: only the age of a leftover tells
    fcntl = None

from .admission import admit_companion, admit_file
from .attnstore import AttentionStore
from .trace import Trace, dumps

SUFFIX = ".attn.safetensors"
STALE_S = 600  # a temporary file older than this belongs to a save that was killed


def companion_name(json_path: Path, token: str | None = None) -> str:
    return f"{json_path.name.removesuffix('.json')}.{token or secrets.token_hex(4)}{SUFFIX}"


def save(trace: Trace, attention: AttentionStore | None, json_path: str | Path) -> Path:
    """Write trace.json and its companion as a pair; return trace.json's path."""
    return save_pair(trace, attention, json_path)[0]


def save_pair(trace: Trace, attention: AttentionStore | None, json_path: str | Path) -> tuple[Path, str | None]:
    """Write trace.json and its companion as a pair; return trace.json's path and the companion's name.

    A companion already inside the target folder (the CLI records straight there) is renamed into
    place; one elsewhere (the app's temporary folder) is copied. Saves into one folder take turns
    (a lock on the folder), so one save's clean-up never meets another's companion half committed.
    """
    json_path = Path(json_path)
    folder = json_path.parent
    folder.mkdir(parents=True, exist_ok=True)
    name = companion_name(json_path) if attention is not None and trace.attention is not None else None
    if trace.attention is not None:
        trace = trace.model_copy(update={"attention": trace.attention.model_copy(update={"file": name})})
    text = dumps(trace).encode("utf-8")  # refused here (e.g. over the size cap) before anything moves
    with _folder_lock(folder) as exclusive:
        if name is not None:
            if attention.path.parent.resolve() == folder.resolve() and attention.finished_on_disk():
                os.replace(attention.path, folder / name)  # recorded right here (the CLI): no copy
                attention.path = folder / name
            else:
                _atomic_write(folder / name, attention.write_to)
        try:
            _atomic_write(json_path, text)
        except OSError:
            if name is not None:  # e.g. a full disk: no trace.json names it, and the old pair stays whole
                (folder / name).unlink(missing_ok=True)
            raise
        clean_leftovers(json_path, {name} if name else set(), exclusive)
    return json_path, name


def clean_leftovers(json_path: Path, keep: set[str], exclusive: bool = False) -> None:
    """Remove companions trace.json no longer names, and temporary files of killed saves.

    exclusive: this save holds the folder's lock, so no other save is between its companion and its
    trace.json and every companion trace.json does not name is an orphan; without the lock only
    those older than STALE_S go. A temporary file goes only when older than STALE_S and no live
    process claims it (`claim`): a long prefill writes nothing for minutes, yet its writer is alive.
    """
    stem, now = json_path.name.removesuffix(".json"), time.time()
    for p in json_path.parent.iterdir():
        old_pair = p.name.startswith(stem + ".") and (p.name.endswith(SUFFIX) or p.name == stem + ".attn.npz")
        temp = p.name.startswith("." + stem + ".") and p.name.endswith((".tmp", ".part"))
        try:
            old = now - p.stat().st_mtime > STALE_S
            if (old_pair and p.name not in keep and (exclusive or old)) or (temp and old and not _in_use(p)):
                p.unlink()
        except OSError:
            pass  # another process removed it first, or it is not ours to remove


def recording_path(json_path: str | Path) -> Path:
    """Where a run records its companion when it will be saved next to json_path (renamed on save)."""
    json_path = Path(json_path)
    return json_path.parent / f".{json_path.name.removesuffix('.json')}.{secrets.token_hex(4)}{SUFFIX}.part"


def claim(path: str | Path) -> int | None:
    """Mark a file this process writes as in use until the returned descriptor is closed (a shared
    lock the system drops when the process dies), so another run's clean-up leaves it alone."""
    if fcntl is None:
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:  # a file system without locks: the age rule alone protects it
        os.close(fd)
        return None
    return fd


def _in_use(path: Path) -> bool:
    """True while a live process claims the file (its exclusive lock is refused)."""
    if fcntl is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return True  # gone, or not ours to read: leave it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


@contextmanager
def _folder_lock(folder: Path):
    """Hold the folder's exclusive lock (on the folder itself: no lock file is left); yields whether it is held."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        fd = None
    try:
        held = fd is not None and fcntl is not None and _flock(fd, fcntl.LOCK_EX)
        yield held
    finally:
        if fd is not None:
            os.close(fd)


def _flock(fd: int, how: int) -> bool:
    try:
        fcntl.flock(fd, how)
        return True
    except OSError:  # e.g. a network file system without locks
        return False


def _atomic_write(path: Path, data) -> None:
    """Write bytes, or call `data(file)` to stream them, into a temp file, then rename it into place."""
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    if fcntl is not None:
        _flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # claimed while written (a slow copy is not a leftover)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; saved traces are meant to be shared
        with os.fdopen(fd, "wb") as fh:
            fh.write(data) if isinstance(data, bytes) else data(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def open_companion(path: Path, trace: Trace, work_dir: Path | None = None) -> tuple[Trace, AttentionStore]:
    """Open (or, for a schema-1 .attn.npz, convert into work_dir) the companion of `trace` (admission.py)."""
    return admit_companion(path, trace, work_dir)


def load(json_path: str | Path) -> tuple[Trace, AttentionStore | None]:
    """Load trace.json and, when it names one that exists, its attention companion (admission.py)."""
    return admit_file(json_path)

"""The attention companion: a safetensors file written row by row during a run and read lazily.

Layout (standard safetensors, readable by `safetensors.numpy.load_file` or any other reader):
- `prompt_bins` (layers, heads, B, B): the prompt's own T×T attention pooled into B×B cells, each
  the mean weight over the query-key pairs it covers; B = T (exact) whenever T×T fits the byte
  budget for the prompt, so short prompts are stored exactly. Any layer or head can be recomputed
  exactly when the model is loaded (`recompute.py`).
- `prompt_edges` (B+1,) int64: cell boundaries over positions 0..T.
- `row.NNNNN` (layers, heads, T+s): step s's full attention row (the query that chose step s's
  token), every layer and head, exact up to float16 rounding.

The writer reserves room for the header, streams each row to disk as the run goes (nothing grows in
memory) and fills in the header when the run ends, so the file is complete or refused as truncated.
safetensors' own writer needs every tensor in memory at once, hence this small incremental writer.
The reader checks the header against the trace's declared sizes and the file's real size before it
builds anything, and reads one layer of one tensor at a time, so a view costs what it shows.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = "explorer-attention/2"
DTYPES = {"float16": ("F16", np.float16), "float32": ("F32", np.float32)}
HEADER_LIMIT = 8 * 1024 * 1024  # a header bigger than this is refused before parsing
ROW_ENTRY_BYTES = 128  # header room reserved per step
MAX_CELLS = 1024  # prompt cells per axis: one head's cells are at most 4 MiB as float32 in a view
# the trace schema's bounds (trace.py), repeated here so the store needs nothing from the schema
MAX_LAYERS, MAX_PROMPT, MAX_ROWS = 1024, 8192, 4096


class AttentionFileError(ValueError):
    """An attention companion could not be read; the message says what is wrong with it."""


def pooling_width(length: int, bins: int) -> int:
    """Cell width so that at most `bins` equal cells cover positions 0..length (1 when they fit)."""
    return max(1, -(-length // max(1, bins)))


def pooling_edges(length: int, width: int) -> np.ndarray:
    """Boundaries of cells `width` positions wide over 0..length (the last may be shorter)."""
    return np.append(np.arange(0, length, width, dtype=np.int64), np.int64(length))


def prompt_bins_for(budget_bytes: int, layers: int, heads: int, prompt_len: int, itemsize: int = 2) -> int:
    """Largest B with layers × heads × B × B values inside the byte budget (at least 16, at most T and MAX_CELLS)."""
    b = int((budget_bytes / (layers * heads * itemsize)) ** 0.5)
    return max(1, min(prompt_len, MAX_CELLS, max(16, b)))


def prompt_layout(
    budget_bytes: int, layers: int, heads: int, prompt_len: int, itemsize: int = 2
) -> tuple[int, np.ndarray]:
    """(cell width, cell edges) of a prompt's pooled attention within a byte budget: the one rule the
    recorder, the schema-1 converter and the cost estimate share."""
    width = pooling_width(prompt_len, prompt_bins_for(budget_bytes, layers, heads, prompt_len, itemsize))
    return width, pooling_edges(prompt_len, width)


@dataclass(frozen=True)
class Shape:
    layers: int
    heads: int
    prompt_len: int
    bins: int  # B: prompt cells per axis (ceil(T / width))
    dtype: str = "float16"

    @property
    def itemsize(self) -> int:
        return np.dtype(DTYPES[self.dtype][1]).itemsize

    def row_bytes(self, step: int) -> int:
        return self.layers * self.heads * (self.prompt_len + step) * self.itemsize

    def prompt_bytes(self) -> int:
        return self.layers * self.heads * self.bins * self.bins * self.itemsize + 8 * (self.bins + 1)


def file_bytes(shape: Shape, steps: int) -> int:
    """Bytes on disk for a run of `steps` steps (header room aside)."""
    return shape.prompt_bytes() + sum(shape.row_bytes(s) for s in range(steps))


class AttentionWriter:
    """Streams a run's attention into `path`: the prompt cells once, then one row per step."""

    def __init__(self, path: str | Path, shape: Shape, max_steps: int) -> None:
        self.path, self.shape = Path(path), shape
        self.run = secrets.token_hex(8)  # written in the metadata and in trace.json: binds the pair
        self.header_room = _round8(1024 + ROW_ENTRY_BYTES * (max_steps + 2))
        self.index: dict[str, dict] = {}
        self.end = 0  # bytes of data written after the header room
        self.steps = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "wb")  # noqa: SIM115 - held open for the whole run, closed in finish()
        self._fh.write(b"\0" * (8 + self.header_room))  # no valid header until finish(): a killed run is refused

    def write_prompt(self, cells, edges: np.ndarray) -> None:
        """cells: (layers, heads, B, B) pooled prompt attention (numpy or torch); edges: (B+1,) positions."""
        s = self.shape
        if tuple(cells.shape) != (s.layers, s.heads, s.bins, s.bins):
            raise ValueError(
                f"attention prompt_bins has shape {tuple(cells.shape)}; expected {(s.layers, s.heads, s.bins, s.bins)}"
            )
        self.write_prompt_layers((cells[i] for i in range(s.layers)), edges)

    def write_prompt_layers(self, layers, edges: np.ndarray) -> None:
        """The prompt cells from an iterable of per-layer (heads, B, B) arrays, converted to the file's
        dtype one layer at a time: a whole float16 copy of the cells (tens of MB at the default budget)
        would sit beside the float32 sums at the run's peak."""
        s = self.shape
        parts = (_checked(_as(a, s.dtype), (s.heads, s.bins, s.bins)) for a in layers)
        start = self.end
        self._put_parts("prompt_bins", parts, (s.layers, s.heads, s.bins, s.bins), DTYPES[s.dtype][0])
        if self.end - start != s.layers * s.heads * s.bins * s.bins * s.itemsize:
            raise ValueError(f"attention prompt_bins: expected {s.layers} layers")
        self._put("prompt_edges", np.ascontiguousarray(edges, dtype=np.int64), (s.bins + 1,))

    def reserve_rows(self, steps: int) -> list[int]:
        """Room for `steps` rows at once, filled later by position (a converter writes them out of
        order); returns each row's absolute offset in the file."""
        s, starts = self.shape, []
        for step in range(self.steps, self.steps + steps):
            size = s.row_bytes(step)
            self.index[f"row.{step:05d}"] = {
                "dtype": DTYPES[s.dtype][0],
                "shape": [s.layers, s.heads, s.prompt_len + step],
                "data_offsets": [self.end, self.end + size],
            }
            starts.append(8 + self.header_room + self.end)
            self.end += size
        self.steps += steps
        self._fh.flush()
        self._fh.truncate(8 + self.header_room + self.end)
        self._fh.seek(0, os.SEEK_END)
        return starts

    def fileno(self) -> int:
        return self._fh.fileno()

    def cut_to_disk(self) -> int:
        """After a write failed (a full disk): close the file and cut it back to its last tensor wholly on
        disk, forgetting the rest (half a row in the file, whole rows lost in the write buffer). Returns
        the rows kept, or -1 when the prompt's cells are not whole. `reopen_and_finish` then completes it."""
        try:
            self._fh.close()
        except OSError:
            pass  # the buffered bytes that did not fit: the cut drops them
        start = 8 + self.header_room
        on_disk = os.stat(self.path).st_size - start
        names = list(self.index)  # in the order written, so the whole entries come first
        whole = [n for n in names if self.index[n]["data_offsets"][1] <= on_disk]
        for n in names[len(whole) :]:
            del self.index[n]
        self.steps = sum(n.startswith("row.") for n in whole)
        self.end = self.index[whole[-1]]["data_offsets"][1] if whole else 0
        os.truncate(self.path, start + self.end)
        return self.steps if {"prompt_bins", "prompt_edges"} <= set(whole) else -1

    def reopen_and_finish(self) -> Path:
        """Write the header of a file cut by `cut_to_disk` (its room was reserved at the start)."""
        self._fh = open(self.path, "r+b")  # noqa: SIM115 - finish() closes it
        return self.finish()

    def write_row(self, row) -> None:
        """row: (layers, heads, T+s) for the next step s (numpy or torch)."""
        s, step = self.shape, self.steps
        self._put(
            f"row.{step:05d}",
            _as(row, s.dtype),
            (s.layers, s.heads, s.prompt_len + step),
        )
        self.steps += 1

    def _put(self, name: str, arr: np.ndarray, shape: tuple[int, ...]) -> None:
        if arr.shape != shape:
            raise ValueError(f"attention {name} has shape {arr.shape}; expected {shape}")
        code = "I64" if arr.dtype == np.int64 else DTYPES[self.shape.dtype][0]
        self._put_parts(name, [arr], shape, code)

    def _put_parts(self, name: str, parts, shape: tuple[int, ...], code: str) -> None:
        """One tensor written from consecutive contiguous pieces (in order), none copied to bytes."""
        size = 0
        for arr in parts:
            self._fh.write(memoryview(arr).cast("B"))
            size += arr.nbytes
        self.index[name] = {"dtype": code, "shape": list(shape), "data_offsets": [self.end, self.end + size]}
        self.end += size

    def metadata(self) -> dict[str, str]:
        s = self.shape
        return {
            "format": FORMAT,
            "layers": str(s.layers),
            "heads": str(s.heads),
            "prompt_len": str(s.prompt_len),
            "bins": str(s.bins),
            "steps": str(self.steps),
            "dtype": s.dtype,
            "run": self.run,
        }

    def flush(self) -> None:
        if not self._fh.closed:
            self._fh.flush()

    def finish(self) -> Path:
        """Write the header for what was written so far and close the file; callable once."""
        header = json.dumps({"__metadata__": self.metadata(), **self.index}, separators=(",", ":")).encode()
        if len(header) > self.header_room:
            raise RuntimeError(f"attention header needs {len(header)} bytes, {self.header_room} were reserved")
        header += b" " * (self.header_room - len(header))  # safetensors allows trailing spaces
        self._fh.flush()
        self._fh.seek(0)
        self._fh.write(struct.pack("<Q", self.header_room) + header)
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        return self.path

    def reader(self) -> AttentionStore:
        """A reader over what is written so far (works while the run goes on)."""
        self.flush()
        return AttentionStore(self.path, self.shape, self.steps, dict(self.index), 8 + self.header_room, self.run)

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()


def _as(a, dtype: str) -> np.ndarray:
    """A contiguous numpy array in the file's dtype; torch tensors convert in torch (numpy's float16 cast is slow)."""
    if hasattr(a, "numpy"):
        import torch

        return a.detach().to("cpu", {"float16": torch.float16, "float32": torch.float32}[dtype]).contiguous().numpy()
    return np.ascontiguousarray(a, dtype=DTYPES[dtype][1])


def _checked(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if a.shape != shape:
        raise ValueError(f"attention layer has shape {a.shape}; expected {shape}")
    return a


def _round8(n: int) -> int:
    return (n + 7) // 8 * 8


class AttentionStore:
    """Read side of a companion: rows and prompt cells on demand, as float32 numpy arrays."""

    def __init__(
        self, path: Path, shape: Shape, steps: int, index: dict, data_start: int, run: str | None = None
    ) -> None:
        self.path, self.shape, self.steps, self._index, self._start = Path(path), shape, steps, index, data_start
        self.run = run  # the run id binding this companion to its trace.json (None in older files)

    # -- facts ------------------------------------------------------------------------------------
    @property
    def layers(self) -> int:
        return self.shape.layers

    @property
    def heads(self) -> int:
        return self.shape.heads

    @property
    def prompt_len(self) -> int:
        return self.shape.prompt_len

    @property
    def exact_prompt(self) -> bool:
        return self.shape.bins == self.shape.prompt_len

    def nbytes(self) -> int:
        return self._start + max((e["data_offsets"][1] for e in self._index.values()), default=0)

    # -- reading ----------------------------------------------------------------------------------
    def _array(self, name: str, first: int | None = None) -> np.ndarray:
        """A tensor, or its slice `first` along the first axis, read from the file (never mapped: a file
        truncated by someone else while open gives a clear error here, not a SIGBUS in the server)."""
        entry = self._index.get(name)
        if entry is None:
            raise KeyError(f"attention companion has no {name}")
        a, b = entry["data_offsets"]
        shape = list(entry["shape"])
        if first is not None:
            per = (b - a) // shape[0]
            a, b, shape = a + first * per, a + (first + 1) * per, shape[1:]
        dt = np.int64 if entry["dtype"] == "I64" else DTYPES[self.shape.dtype][1]
        try:
            with open(self.path, "rb") as fh:
                data = os.pread(fh.fileno(), b - a, self._start + a)
        except OSError as exc:
            raise AttentionFileError(f"cannot read attention companion {self.path.name}: {exc.strerror}") from None
        if len(data) != b - a:
            raise AttentionFileError(f"attention companion {self.path.name} is truncated")
        return np.frombuffer(data, dtype=dt).reshape(shape)

    def edges(self) -> np.ndarray:
        return np.asarray(self._array("prompt_edges"))

    def prompt_cells(self, layer: int, head: int | None) -> np.ndarray:
        """(B, B) pooled prompt attention of one layer; head None = mean over heads."""
        return _pick(self._array("prompt_bins", layer), head)

    def row(self, step: int, layer: int, head: int | None) -> np.ndarray:
        """(T+step,) attention row of the query that chose step `step`; head None = mean over heads."""
        if not 0 <= step < self.steps:
            raise IndexError(f"step {step} is outside the {self.steps} recorded steps")
        return _pick(self._array(f"row.{step:05d}", layer), head)

    def row_all(self, step: int) -> np.ndarray:
        """(layers, heads, T+step) float32: every layer and head of one step's row."""
        return self._array(f"row.{step:05d}").astype(np.float32)

    def close(self) -> None:
        """Nothing is held open between reads; kept for callers that release a store."""

    # -- writing a self-contained copy ----------------------------------------------------------
    def header(self) -> bytes:
        """The safetensors header (length prefix included) for the rows this reader covers."""
        meta = {
            "format": FORMAT,
            **{k: str(v) for k, v in vars(self.shape).items() if k != "dtype"},
            "dtype": self.shape.dtype,
            "steps": str(self.steps),
            **({"run": self.run} if self.run else {}),
        }
        body = json.dumps({"__metadata__": meta, **self._index}, separators=(",", ":")).encode()
        body += b" " * (_round8(len(body)) - len(body))
        return struct.pack("<Q", len(body)) + body

    def write_to(self, fh, piece: int = 4 * 1024 * 1024) -> None:
        """A complete companion for these rows, whether or not the run writing this file has finished."""
        fh.write(self.header())
        end = self.nbytes()
        with open(self.path, "rb") as src:
            src.seek(self._start)
            pos = self._start
            while pos < end:
                chunk = src.read(min(piece, end - pos))
                if not chunk:
                    raise AttentionFileError(f"attention companion {self.path.name} is truncated")
                fh.write(chunk)
                pos += len(chunk)

    def finished_on_disk(self) -> bool:
        """True when the file itself carries a header describing exactly these rows."""
        with open(self.path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
        return n + 8 == self._start and self.path.stat().st_size == self.nbytes() and n > 0


def _pick(a: np.ndarray, head: int | None) -> np.ndarray:
    """a: (heads, ...) -> one head or the mean over heads, as float32."""
    return a.astype(np.float32).mean(axis=0) if head is None else a[head].astype(np.float32)


def open_store(path: str | Path, expect: tuple[Shape, int] | None = None) -> AttentionStore:
    """Open a finished companion, checking its header before anything is built or read.

    expect: the (shape, steps) the trace declares; the metadata must match them before the header's
    entries are looked at, so a claimed size never drives any work."""
    path = Path(path)
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise AttentionFileError(f"{path.name} is not a regular file")
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise AttentionFileError(f"{path.name} is too short to be an attention companion")
            (n,) = struct.unpack("<Q", head)
            if n == 0:
                raise AttentionFileError(f"{path.name} was not finished (the run writing it did not end): record again")
            if n > HEADER_LIMIT or 8 + n > st.st_size:
                raise AttentionFileError(f"{path.name} has a header of {n} bytes, which the file cannot hold")
            header = json.loads(fh.read(n))
    except OSError as exc:
        raise AttentionFileError(f"cannot read {path.name}: {exc.strerror}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # bad JSON, deep nesting, huge numbers
        raise AttentionFileError(f"{path.name} is not an attention companion: {str(exc)[:200]}") from None
    shape, steps, run = _check_meta(header, path.name)
    if expect is not None and (shape, steps) != expect:
        names = "layers, heads, prompt tokens, prompt cells, dtype"
        got = (*vars(shape).values(), steps)
        raise AttentionFileError(
            f"attention companion is for ({names}, steps) = {got}; this trace needs {(*vars(expect[0]).values(), expect[1])}"
        )
    data = st.st_size - 8 - n
    if file_bytes(shape, steps) != data:
        raise AttentionFileError(
            f"{path.name} holds {data} bytes of data; its metadata describes {file_bytes(shape, steps)}: "
            "truncated or padded"
        )
    index = _check_entries(header, shape, steps, path.name)
    return AttentionStore(path, shape, steps, index, 8 + n, run)


def _check_meta(header, name: str) -> tuple[Shape, int, str | None]:
    """The metadata alone, within the schema's bounds, before any entry is looked at."""
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise AttentionFileError(f"{name} is not an attention companion of format {FORMAT}")
    try:
        ints = {k: _small_int(meta[k]) for k in ("layers", "heads", "prompt_len", "bins", "steps")}
        shape = Shape(ints["layers"], ints["heads"], ints["prompt_len"], ints["bins"], str(meta["dtype"])[:16])
    except (KeyError, ValueError, TypeError) as exc:
        raise AttentionFileError(f"{name}: bad metadata ({str(exc)[:200]})") from None
    bounds = {
        "layers": (1, MAX_LAYERS),
        "heads": (1, MAX_LAYERS),
        "prompt_len": (1, MAX_PROMPT),
        "steps": (0, MAX_ROWS),
    }
    bad = next((k for k, (low, top) in bounds.items() if not low <= ints[k] <= top), None)
    if shape.dtype not in DTYPES or bad is not None:
        raise AttentionFileError(f"{name}: metadata {bad or 'dtype'} out of range")
    if not 1 <= shape.bins <= min(shape.prompt_len, MAX_CELLS):
        raise AttentionFileError(f"{name}: {shape.bins} prompt cells for a {shape.prompt_len}-token prompt")
    run = meta.get("run")
    if run is not None and not (isinstance(run, str) and len(run) <= 64):
        raise AttentionFileError(f"{name}: bad run id in its metadata")
    return shape, ints["steps"], run


def _small_int(v) -> int:
    """A metadata count: a decimal string of at most 9 digits (a longer one is refused, never parsed)."""
    if not isinstance(v, str) or not v.isascii() or not v.isdigit() or len(v) > 9:
        raise ValueError(f"{str(v)[:20]!r} is not a count")
    return int(v)


def _check_entries(header: dict, shape: Shape, steps: int, name: str) -> dict:
    """Every tensor entry: names, dtypes, shapes and back-to-back offsets (metadata already bounded)."""
    index = {k: v for k, v in header.items() if k != "__metadata__"}
    if len(index) != steps + 2:
        raise AttentionFileError(f"{name}: its tensors do not match its metadata ({len(index)} vs {steps + 2})")
    want = {"prompt_bins": ([shape.layers, shape.heads, shape.bins, shape.bins], DTYPES[shape.dtype][0])}
    want["prompt_edges"] = ([shape.bins + 1], "I64")
    for s in range(steps):
        want[f"row.{s:05d}"] = ([shape.layers, shape.heads, shape.prompt_len + s], DTYPES[shape.dtype][0])
    pos = 0
    for key, (dims, code) in want.items():  # written in this order, back to back
        e = index.get(key)
        nbytes = int(np.prod(dims)) * (8 if code == "I64" else shape.itemsize)
        ok = isinstance(e, dict) and e.get("shape") == dims and e.get("dtype") == code
        if not ok or e.get("data_offsets") != [pos, pos + nbytes]:
            raise AttentionFileError(f"{name}: tensor {key} is {str(e)[:200]}; expected {dims} {code} at offset {pos}")
        pos += nbytes
    return index


def check_values(store: AttentionStore, piece: int = 4 * 1024 * 1024) -> None:
    """Every weight finite and within [0, 1] (float16 rounding allowed), read in pieces: a companion with
    NaN, infinite, negative or larger values is refused when admitted, not found out by a view later."""
    dt = DTYPES[store.shape.dtype][1]
    item = np.dtype(dt).itemsize
    spans = [e["data_offsets"] for k, e in store._index.items() if k != "prompt_edges"]
    with open(store.path, "rb") as fh:
        for a, b in spans:
            for pos in range(a, b, piece):
                n = min(piece, b - pos) // item * item
                data = os.pread(fh.fileno(), n, store._start + pos)
                if len(data) != n:
                    raise AttentionFileError(f"attention companion {store.path.name} is truncated")
                v = np.frombuffer(data, dtype=dt)
                if v.size and not (np.isfinite(v).all() and v.min() >= 0 and v.max() <= 1.001):
                    raise AttentionFileError(
                        f"attention companion {store.path.name} holds weights outside [0, 1] or not finite"
                    )

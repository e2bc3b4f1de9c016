"""The Trace: one run as plain data (pydantic models), its JSON schema, and atomic save/load.

trace.json holds everything but the full attention, which goes into a compact float16 companion
(`<name>.attn.npz`) that trace.json names: the prompt's attention from the prefill, shape
(layers, heads, T, T), and each step's attention row over all earlier positions, concatenated into
(layers, heads, sum of row lengths) with row lengths T, T+1, ... in step order. Each float16 array
is stored as its two byte planes (uint8, shape (2, size): all low bytes, then all high bytes), which
zlib packs about 10% tighter than the interleaved bytes; reading reverses it exactly.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .config import GenerationConfig

SCHEMA_VERSION = 1
StopReason = Literal["max_new_tokens", "eos", "stop_on", "clean_stop", "interrupted", "running"]
Prob = Annotated[float, Field(ge=0.0, le=1.0)]
# Bounds for files from outside: generous for real runs, small enough that a hostile file is refused early.
MAX_STEPS = 4096
MAX_PROMPT_TOKENS = 8192
MAX_CANDIDATES = 100
MAX_TOKEN_CHARS = 256
MAX_TEXT_CHARS = 200_000
MAX_TRACE_BYTES = 50 * 1024 * 1024
TokenId = Annotated[int, Field(ge=0, lt=10_000_000)]
TokenText = Annotated[str, Field(max_length=MAX_TOKEN_CHARS)]
Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
Name = Annotated[str, Field(max_length=1000)]


class TraceError(ValueError):
    """A trace file could not be read; the message says what is wrong with it."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=False)


class Candidates(_Strict):
    """The top candidates of one distribution, most likely first."""

    ids: list[TokenId] = Field(max_length=MAX_CANDIDATES)
    labels: list[TokenText] = Field(max_length=MAX_CANDIDATES)
    probs: list[Prob] = Field(max_length=MAX_CANDIDATES)

    @model_validator(mode="after")
    def _same_lengths(self) -> Candidates:
        if not len(self.ids) == len(self.labels) == len(self.probs):
            raise ValueError("ids, labels and probs must have the same length")
        return self


class StageTrack(_Strict):
    """Tracked candidates' probability after each stage of the processing chain (row 0 = raw)."""

    stages: list[Name] = Field(max_length=16)
    ids: list[TokenId] = Field(max_length=2 * MAX_CANDIDATES + 8)
    labels: list[TokenText] = Field(max_length=2 * MAX_CANDIDATES + 8)
    probs: list[list[Prob]] = Field(max_length=16, description="probs[stage][candidate]")

    @model_validator(mode="after")
    def _shape(self) -> StageTrack:
        if not self.stages or self.stages[0] != "raw" or not self.ids:
            raise ValueError("stage track: needs the 'raw' stage first and at least one candidate")
        if len(self.ids) != len(self.labels) or len(self.probs) != len(self.stages):
            raise ValueError("stage track: ids/labels or stages/probs lengths differ")
        if any(len(row) != len(self.ids) for row in self.probs):
            raise ValueError("stage track: every stage needs one probability per tracked candidate")
        return self


class LensRecord(_Strict):
    """Logit lens for one step: each layer's hidden state through the final norm and the output head."""

    top_ids: list[TokenId] = Field(max_length=1024)
    top_labels: list[TokenText] = Field(max_length=1024)
    top_probs: list[Prob] = Field(max_length=1024)
    chosen_probs: list[Prob] = Field(
        max_length=1024, description="Per layer, the probability of the token finally chosen."
    )

    @model_validator(mode="after")
    def _same_lengths(self) -> LensRecord:
        if not len(self.top_ids) == len(self.top_labels) == len(self.top_probs) == len(self.chosen_probs) > 0:
            raise ValueError("logit lens: the four per-layer lists must be non-empty and of the same length")
        return self


class StepRecord(_Strict):
    """One generated token and what the model considered when choosing it."""

    step: int = Field(ge=0, lt=MAX_STEPS)
    position: int = Field(
        ge=0, lt=MAX_STEPS + MAX_PROMPT_TOKENS, description="Position of the chosen token in the whole sequence."
    )
    token_id: TokenId
    piece: TokenText = Field(description="The tokenizer's raw piece, e.g. 'Ġthe'.")
    label: TokenText = Field(description="Readable label, e.g. '␣the'.")
    p_raw: Prob = Field(description="Chosen token's probability under the model's raw distribution.")
    p_proc: Prob = Field(description="Chosen token's probability after the processing chain.")
    rank_raw: int = Field(
        ge=1, lt=10_000_000, description="Chosen token's rank in the raw distribution (1 = most likely)."
    )
    entropy_raw: float = Field(ge=0.0, le=64.0, description="Entropy of the raw distribution, in bits.")
    entropy_proc: float = Field(ge=0.0, le=64.0, description="Entropy after processing, in bits.")
    top_raw: Candidates
    top_proc: Candidates
    time_s: float = Field(
        ge=0.0, le=86_400.0, description="Wall time: the forward that produced these logits + selection."
    )
    attn_snapshot: list[Prob] | None = Field(
        default=None,
        max_length=MAX_STEPS + MAX_PROMPT_TOKENS,
        description="Head-mean last-layer attention row of this step's query, every attn_every steps.",
    )
    stages: StageTrack | None = None
    lens: LensRecord | None = None
    forced: bool = Field(default=False, description="True when the user chose this token (a branch point).")


class Branch(_Strict):
    """Another continuation: the path of `parent` up to `at_step`, then the user's token, then generation."""

    id: int = Field(ge=1, le=1000)
    parent: int = Field(ge=0, le=1000, description="0 is the main run; otherwise an earlier branch's id.")
    at_step: int = Field(ge=0, lt=MAX_STEPS)
    steps: list[StepRecord] = Field(max_length=MAX_STEPS, description="Steps from at_step on.")
    stop_reason: StopReason
    output_text: Text


class ModelInfo(_Strict):
    name: Name
    location: Name
    file: Name | None = None
    dtype: Name
    device: Name
    n_layers: int = Field(ge=1, le=1024)
    n_heads: int = Field(ge=1, le=1024)
    vocab_size: int = Field(ge=1, lt=10_000_000)
    attn_implementation: Name = "eager"


class Timing(_Strict):
    load_s: float = Field(ge=0.0)
    prefill_s: float = Field(ge=0.0)
    generate_s: float = Field(ge=0.0, description="Prefill plus every step.")
    tokens_per_s: float = Field(ge=0.0)


class AttentionInfo(_Strict):
    file: Name | None = Field(description="Companion file name next to trace.json, or null if not saved.")
    layers: int = Field(ge=1, le=1024)
    heads: int = Field(ge=1, le=1024)
    dtype: Literal["float16"] = "float16"
    snapshot_layer: int = Field(ge=0)
    snapshot_every: int = Field(ge=0, description="0: no snapshots.")


class Trace(_Strict):
    """A whole run. Everything here is plain data: it round-trips through JSON unchanged."""

    schema_version: Literal[1] = SCHEMA_VERSION
    created: Name
    model: ModelInfo
    versions: dict[Name, Name] = Field(max_length=50)
    config: dict[Name, Text | bool | Annotated[int, Field(ge=-(2**63), lt=2**63)] | float] = Field(max_length=100)
    chat_applied: bool
    input_text: Text = Field(description="The text fed to the model (the prompt after the chat template).")
    prompt_ids: list[TokenId] = Field(min_length=1, max_length=MAX_PROMPT_TOKENS)
    prompt_pieces: list[TokenText] = Field(max_length=MAX_PROMPT_TOKENS)
    prompt_labels: list[TokenText] = Field(max_length=MAX_PROMPT_TOKENS)
    steps: list[StepRecord] = Field(max_length=MAX_STEPS)
    stop_reason: StopReason
    output_text: Text
    timing: Timing
    attention: AttentionInfo | None = None
    branches: list[Branch] = Field(default_factory=list, max_length=64)

    @model_validator(mode="after")
    def _consistent(self) -> Trace:
        """Cross-field checks the views rely on: aligned prompt lists and steps in order."""
        t = len(self.prompt_ids)
        if not len(self.prompt_pieces) == len(self.prompt_labels) == t:
            raise ValueError("prompt_ids, prompt_pieces and prompt_labels must have the same length")
        for i, s in enumerate(self.steps):
            if s.step != i or s.position != t + i:
                raise ValueError(f"step {i} is numbered {s.step} at position {s.position}; expected {i} at {t + i}")
            if s.attn_snapshot is not None and len(s.attn_snapshot) != t + i:
                raise ValueError(f"step {i}'s attention snapshot has {len(s.attn_snapshot)} values; expected {t + i}")
        self._check_ids()
        self._check_config()
        known = {0: len(self.steps)}
        for b in self.branches:
            if b.id in known or b.parent not in known:
                raise ValueError(f"branch {b.id} repeats an id or names an unknown parent {b.parent}")
            if b.at_step > known[b.parent]:
                raise ValueError(f"branch {b.id} splits at step {b.at_step}, past the end of its parent")
            for j, s in enumerate(b.steps):
                if s.step != b.at_step + j or s.position != t + s.step:
                    raise ValueError(f"branch {b.id}: step {j} is numbered {s.step}; expected {b.at_step + j}")
            known[b.id] = b.at_step + len(b.steps)
        return self

    def _check_ids(self) -> None:
        """Every token id must exist in the model's vocabulary (replay and branches feed them to the model)."""
        v = self.model.vocab_size
        ids = list(self.prompt_ids)
        for s in list(self.steps) + [s for b in self.branches for s in b.steps]:
            ids += [s.token_id, *s.top_raw.ids, *s.top_proc.ids]
            ids += s.stages.ids if s.stages else []
            ids += s.lens.top_ids if s.lens else []
            if s.lens and len(s.lens.top_ids) != self.model.n_layers:
                raise ValueError(
                    f"step {s.step}'s logit lens has {len(s.lens.top_ids)} layers, not {self.model.n_layers}"
                )
        bad = next((i for i in ids if i >= v), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the model's vocabulary of {v}")

    def _check_config(self) -> None:
        GenerationConfig.from_dict(self.config)  # raises ValueError naming a bad setting

    def branch(self, branch_id: int) -> Branch | None:
        return next((b for b in self.branches if b.id == branch_id), None)

    def path_steps(self, branch_id: int = 0) -> list[StepRecord]:
        """Every step of a branch's path from the first generated token (0 = the main run)."""
        if branch_id == 0:
            return list(self.steps)
        b = self.branch(branch_id)
        if b is None:
            raise KeyError(f"no branch {branch_id}")
        return self.path_steps(b.parent)[: b.at_step] + list(b.steps)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    def labels_upto(self, step: int) -> list[str]:
        """Labels of the positions a step's query can see: the prompt and the tokens before it."""
        return self.prompt_labels + [s.label for s in self.steps[:step]]


@dataclass
class AttentionData:
    """Full attention of a run: prompt (layers, heads, T, T) and per-step rows (layers, heads, T+step)."""

    prompt: np.ndarray
    rows: list[np.ndarray]

    def matrix(self, step: int, layer: int, head: int | None) -> np.ndarray:
        """Lower-triangular (T+step, T+step) attention of the sequence seen at `step`; head None = mean."""
        t = self.prompt.shape[-1]
        n = t + step
        out = np.zeros((n, n), dtype=np.float32)
        pick = (lambda a: a.astype(np.float32).mean(axis=0)) if head is None else (lambda a: a[head].astype(np.float32))
        out[:t, :t] = pick(self.prompt[layer])
        for j in range(1, step + 1):  # step j's query sits at position t+j-1
            out[t + j - 1, : t + j] = pick(self.rows[j][layer])
        return out


def dumps(trace: Trace) -> str:
    """trace.json text, checked by the same parser that reads it: the tool never writes a file it would refuse."""
    text = trace.model_dump_json(indent=1)
    parse(text)
    return text


def companion_name(json_path: Path) -> str:
    return json_path.name.removesuffix(".json") + ".attn.npz"


def save(trace: Trace, attention: AttentionData | None, json_path: str | Path) -> Path:
    """Write trace.json (and its companion) atomically: each file is complete or not there."""
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    if attention is not None and trace.attention is not None:
        trace = trace.model_copy(
            update={"attention": trace.attention.model_copy(update={"file": companion_name(json_path)})}
        )
        _atomic_write(json_path.parent / companion_name(json_path), lambda fh: write_attention(fh, attention))
    _atomic_write(json_path, dumps(trace).encode("utf-8"))
    return json_path


def _planes(a: np.ndarray) -> np.ndarray:
    """float16 array -> (2, size) uint8 byte planes."""
    return np.ascontiguousarray(a, dtype=np.float16).view(np.uint8).reshape(-1, 2).T.copy()


def _unplane(planes: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return planes.T.copy().view(np.float16).reshape(shape)


def write_attention(fh, attention: AttentionData) -> None:
    """Stream the companion into an open binary file; rows go to float16 one by one to keep memory low."""
    rows = np.concatenate(
        [r.astype(np.float16) for r in attention.rows] or [np.zeros(attention.prompt.shape[:2] + (0,), np.float16)],
        axis=-1,
    )
    lengths = np.array([r.shape[-1] for r in attention.rows], dtype=np.int64)
    np.savez_compressed(fh, prompt=_planes(attention.prompt), rows=_planes(rows), lengths=lengths)


def attention_bytes(attention: AttentionData) -> bytes:
    buf = io.BytesIO()
    write_attention(buf, attention)
    return buf.getvalue()


def _atomic_write(path: Path, data) -> None:
    """Write bytes, or call `data(file)` to stream them, into a temp file, then rename it into place."""
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
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


def parse(data: bytes | str) -> Trace:
    """Validate trace.json bytes strictly in one step; any problem becomes one TraceError."""
    if len(data) > MAX_TRACE_BYTES:  # checked before parsing anything
        raise TraceError(f"trace is {len(data) / 1e6:.1f} MB, over the {MAX_TRACE_BYTES / 1e6:.0f} MB limit for traces")
    if not data or not (data.strip() if isinstance(data, bytes) else data.strip()):
        raise TraceError("the file is empty: choose a trace.json written by Model Interpret Explorer")
    try:
        return Trace.model_validate_json(data)
    except ValidationError as exc:
        raise TraceError(_describe(exc)) from None
    except (ValueError, RecursionError) as exc:
        raise TraceError(f"not a valid trace file: {exc}") from None


def _describe(exc: ValidationError) -> str:
    errs = exc.errors(include_url=False, include_input=False)
    first = errs[0]
    where = ".".join(str(p) for p in first["loc"]) or "file"
    if first["type"] == "literal_error" and first["loc"] == ("schema_version",):
        return "unsupported schema_version: this version reads schema_version 1; update Model Interpret Explorer"
    if first["type"] == "json_invalid":
        return f"not valid JSON: {first['msg']}"
    more = f" (and {len(errs) - 1} more problems)" if len(errs) > 1 else ""
    return f"invalid trace at {where}: {first['msg']}{more}"


MAX_ATTENTION_BYTES = 2 * 1024**3  # inflated companion; a 2048-step run of the default model is about 1.2 GB


def _companion_headers(data: bytes) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of each array in the companion, read from the .npy headers before any data."""
    out = {}
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for name in ("prompt", "rows", "lengths"):
            with zf.open(name + ".npy") as fh:
                version = np.lib.format.read_magic(fh)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(fh)
            out[name] = (tuple(shape), np.dtype(dtype))
    return out


def _check_companion(headers: dict, trace: Trace) -> None:
    info, t = trace.attention, trace.prompt_len
    if info is None:
        raise TraceError("trace has no attention section, so no companion belongs to it")
    n, total = len(trace.steps), sum(t + i for i in range(len(trace.steps)))
    want = {
        "prompt": ((2, info.layers * info.heads * t * t), "uint8"),  # byte planes of float16
        "rows": ((2, info.layers * info.heads * total), "uint8"),
        "lengths": ((n,), "int64"),
    }
    for name, (shape, dtype) in want.items():
        got_shape, got_dtype = headers[name]
        if got_shape != shape or got_dtype != np.dtype(dtype):
            raise TraceError(
                f"attention companion's {name} is {got_dtype} {got_shape}; the trace's {n} steps need {dtype} {shape}"
            )
    size = 2 * (info.layers * info.heads * (t * t + total))
    if size > MAX_ATTENTION_BYTES:
        raise TraceError(
            f"attention companion would take {size / 1e9:.1f} GB in memory, over the "
            f"{MAX_ATTENTION_BYTES / 1e9:.1f} GB limit"
        )


def parse_attention(data: bytes, trace: Trace) -> AttentionData:
    """Read a companion: check its headers against the trace before inflating, then its values."""
    try:
        _check_companion(_companion_headers(data), trace)
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            prompt_planes, row_planes, lengths = npz["prompt"], npz["rows"], npz["lengths"]
    except TraceError:
        raise
    except (
        OSError,
        ValueError,
        KeyError,
        zipfile.BadZipFile,
        EOFError,
        zlib.error,
        NotImplementedError,
        RuntimeError,
    ) as exc:
        raise TraceError(f"attention companion is not readable: {exc}") from None
    t, info = trace.prompt_len, trace.attention
    if not np.array_equal(lengths, np.arange(len(trace.steps)) + t):
        raise TraceError(f"attention companion's row lengths do not match the trace's {len(trace.steps)} steps")
    prompt = _unplane(prompt_planes, (info.layers, info.heads, t, t))
    rows = _unplane(row_planes, (info.layers, info.heads, int(lengths.sum())))
    for name, arr in (("prompt", prompt), ("rows", rows)):
        if arr.size and (not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1.001):
            raise TraceError(f"attention companion's {name} holds values outside [0, 1] or not finite")
    split = np.cumsum(lengths)[:-1]
    return AttentionData(prompt=prompt, rows=list(np.split(rows, split, axis=-1)) if len(lengths) else [])


def load(json_path: str | Path) -> tuple[Trace, AttentionData | None]:
    """Load trace.json and, when it names one that exists, its attention companion."""
    json_path = Path(json_path)
    try:
        size = json_path.stat().st_size
        if size > MAX_TRACE_BYTES:
            raise TraceError(
                f"{json_path.name} is {size / 1e6:.1f} MB, over the {MAX_TRACE_BYTES / 1e6:.0f} MB limit for traces"
            )
        trace = parse(json_path.read_bytes())
    except OSError as exc:
        raise TraceError(f"cannot read {json_path}: {exc.strerror}") from None
    info = trace.attention
    if info is None or info.file is None:
        return trace, None
    comp = json_path.parent / Path(info.file).name  # never follow a path out of the trace's folder
    if not comp.is_file():
        return trace, None
    return trace, parse_attention(comp.read_bytes(), trace)


def json_schema() -> str:
    return json.dumps(Trace.model_json_schema(), indent=2, sort_keys=True) + "\n"

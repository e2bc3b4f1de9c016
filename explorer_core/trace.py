"""The Trace: one run as plain data (pydantic models), its JSON schema, and atomic save/load.

trace.json holds everything but the full attention, which goes into a compact float16 companion
(`<name>.attn.npz`) that trace.json names: the prompt's attention from the prefill, shape
(layers, heads, T, T), and each step's attention row over all earlier positions, concatenated into
(layers, heads, sum of row lengths) with row lengths T, T+1, ... in step order.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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
    snapshot_every: int = Field(ge=1)


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
    return trace.model_dump_json(indent=1)


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
        _atomic_write(json_path.parent / companion_name(json_path), attention_bytes(attention))
    _atomic_write(json_path, dumps(trace).encode("utf-8"))
    return json_path


def attention_bytes(attention: AttentionData) -> bytes:
    buf = io.BytesIO()
    rows = (
        np.concatenate(attention.rows, axis=-1)
        if attention.rows
        else np.zeros(attention.prompt.shape[:2] + (0,), np.float16)
    )
    lengths = np.array([r.shape[-1] for r in attention.rows], dtype=np.int64)
    np.savez_compressed(buf, prompt=attention.prompt.astype(np.float16), rows=rows.astype(np.float16), lengths=lengths)
    return buf.getvalue()


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; saved traces are meant to be shared
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
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


def parse_attention(data: bytes, trace: Trace) -> AttentionData:
    """Read a companion and check its shapes against the trace's steps."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            prompt, rows, lengths = npz["prompt"], npz["rows"], npz["lengths"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        raise TraceError(f"attention companion is not readable: {exc}") from None
    info, t = trace.attention, trace.prompt_len
    if info is None:
        raise TraceError("trace has no attention section, so no companion belongs to it")
    want = (info.layers, info.heads, t, t)
    if prompt.shape != want:
        raise TraceError(f"attention companion's prompt shape {prompt.shape} does not match the trace's {want}")
    expect = np.arange(len(trace.steps)) + t
    if (
        lengths.shape != expect.shape
        or not np.array_equal(lengths, expect)
        or rows.shape != (info.layers, info.heads, int(expect.sum()))
    ):
        raise TraceError(
            f"attention companion holds {len(lengths)} rows that do not match the trace's {len(trace.steps)} steps"
        )
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

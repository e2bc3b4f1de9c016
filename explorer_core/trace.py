"""The Trace: one run as plain data (pydantic models), its JSON schema and strict parsing.

trace.json holds everything but the full attention, which lives in a companion file that trace.json
names (see attnstore.py for its layout, tracefile.py for saving and loading the pair). Schema 2
changed only the attention section (the companion's format); schema-1 files are upgraded on reading.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .config import GenerationConfig

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
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
    varentropy: float | None = Field(
        default=None, ge=0.0, le=16384.0, description="Variance of the raw distribution's surprisal, in bits²."
    )
    forced: bool = Field(default=False, description="True when the user chose this token (a branch point).")


class Branch(_Strict):
    """Another continuation: the path of `parent` up to `at_step`, then the user's token (or, with an
    intervention kept on, the rules' choice), then generation."""

    id: int = Field(ge=1, le=1000)
    parent: int = Field(ge=0, le=1000, description="0 is the main run; otherwise an earlier branch's id.")
    at_step: int = Field(ge=0, lt=MAX_STEPS)
    steps: list[StepRecord] = Field(max_length=MAX_STEPS, description="Steps from at_step on.")
    stop_reason: StopReason
    output_text: Text
    intervention: Name | None = Field(
        default=None,
        description="A change kept on while this branch ran ('What if?'), e.g. 'zero 29.3 (this position)'.",
    )


class ModelInfo(_Strict):
    name: Name
    location: Name
    file: Name | None = None
    dtype: Name
    device: Name
    n_layers: int = Field(ge=1, le=1024)
    n_heads: int = Field(ge=0, le=1024, description="0: an attention-free model.")
    vocab_size: int = Field(ge=1, lt=10_000_000)
    attn_implementation: Name = "eager"


class Timing(_Strict):
    load_s: float = Field(ge=0.0)
    prefill_s: float = Field(ge=0.0)
    generate_s: float = Field(ge=0.0, description="Prefill plus every step.")
    tokens_per_s: float = Field(ge=0.0, description="Decoding speed: tokens after the first over their steps' time.")


class AttentionInfo(_Strict):
    file: Name | None = Field(description="Companion file name next to trace.json, or null if not saved.")
    layers: int = Field(ge=1, le=1024)
    heads: int = Field(ge=1, le=1024)
    dtype: Literal["float16", "float32"] = "float16"
    prompt_cells: int = Field(
        ge=1,
        le=MAX_PROMPT_TOKENS,
        description="Cells per axis of the prompt's pooled T×T attention in the companion (= prompt length when exact).",
    )
    snapshot_layer: int = Field(ge=0)
    snapshot_every: int = Field(ge=0, description="0: no snapshots.")
    silent_layers: list[Annotated[int, Field(ge=0, le=1024)]] = Field(
        default_factory=list,
        max_length=1024,
        description="Layers without attention weights (state-space, convolution, recurrent layers): rows of zeros.",
    )
    run: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{1,64}$",
        description="Run id also written in the companion's metadata: a companion of another run is refused.",
    )


class FidelityCheck(_Strict):
    feature: Literal["tokens", "attention", "lens", "explain"]
    ok: bool
    figure: float | None = Field(default=None, description="The measured largest difference.")
    tolerance: float | None = None
    detail: Text


class FidelityInfo(_Strict):
    """The model's fidelity check at load: each feature's figure against transformers' own reference."""

    probe_tokens: int = Field(ge=0, le=1_000_000)
    new_tokens: int = Field(ge=0, le=1_000_000)
    windows: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list, max_length=16)
    way: Literal["own", "fast"] | None = Field(
        default=None, description="own: the model's eager function; fast: a copy proven equal; null: none."
    )
    silent_layers: list[Annotated[int, Field(ge=0, le=1024)]] = Field(default_factory=list, max_length=1024)
    checks: list[FidelityCheck] = Field(default_factory=list, max_length=8)
    seconds: float = Field(ge=0.0, le=1e7)


class TokenRef(_Strict):
    id: TokenId
    label: TokenText


MAX_POSITIONS = MAX_PROMPT_TOKENS + MAX_STEPS
Score = Annotated[float, Field(ge=-1e9, le=1e9)]


class InputScores(_Strict):
    """Input attribution: per method, one score per earlier position (prompt, then generated tokens)."""

    positions: list[int] = Field(max_length=MAX_POSITIONS)
    labels: list[TokenText] = Field(max_length=MAX_POSITIONS)
    methods: dict[Name, list[Score]] = Field(max_length=8)
    baseline: Name = Field(description="Integrated gradients' baseline.")
    ig_steps: int = Field(ge=1, le=4096)

    @model_validator(mode="after")
    def _aligned(self) -> InputScores:
        if len(self.labels) != len(self.positions) or any(len(v) != len(self.positions) for v in self.methods.values()):
            raise ValueError("input attribution: labels and every method's scores need one value per position")
        return self


class Components(_Strict):
    """The logit difference split into direct contributions (final norm scale frozen); they sum to it."""

    embed: Score
    heads: list[list[Score]] = Field(max_length=1024, description="heads[layer][head]; one row per layer, rows equal")
    mlps: list[Score] = Field(max_length=1024)
    attn_bias: list[Score] = Field(max_length=1024, description="Each attention output projection's bias.")
    bias: Score = Field(description="Final norm's and output head's biases (0 for llama-like models).")


MAX_COMPONENT_CELLS = 65_536  # layers × heads of one breakdown: what its heatmap may draw


class Explanation(_Strict):
    """Why a step chose `target` over `contrast`: input attribution and component breakdown."""

    step: int = Field(ge=0, lt=MAX_STEPS)
    branch: int = Field(default=0, ge=0, le=1000)
    target: TokenRef
    contrast: TokenRef
    logit_diff: Score
    inputs: InputScores
    components: Components
    checks: dict[Name, Score] = Field(max_length=16)
    timing_s: dict[Name, Annotated[float, Field(ge=0.0)]] = Field(max_length=16)


class Outcome(_Strict):
    """The logit difference (target - contrast) at a step and the raw top-k there."""

    logit_diff: Score
    top: Candidates


class Prediction(_Strict):
    direct: Score | None = Field(
        description="The breakdown's predicted change of the logit difference (after - before): the changed "
        "part's direct effect, later layers and the final norm's scale held. None when the breakdown cannot "
        "read the model (note says why)."
    )
    note: Name | None = None


class InterventionRecord(_Strict):
    """A 'What if?' result: one part changed at a step, the measured effect beside the prediction."""

    step: int = Field(ge=0, lt=MAX_STEPS)
    branch: int = Field(default=0, ge=0, le=1000)
    target: TokenRef
    contrast: TokenRef
    part: Annotated[str, Field(max_length=40)] = Field(description="L.H, L.mlp, embed@P or resid:L@P.")
    operation: Name = Field(description="zero, mean, scale:F, patch or steer:F (F: the strength).")
    steer_texts: list[Text] | None = Field(
        default=None, min_length=2, max_length=2, description="steer: the direction is mean(text 1) - mean(text 2)."
    )
    source_ids: list[TokenId] | None = Field(
        default=None, max_length=MAX_POSITIONS, description="patch: the source sequence's token ids."
    )
    scope: Literal["step", "all"] = Field(description="step: this step's position only; all: every position.")
    before: Outcome
    after: Outcome
    frozen_norm_logit_diff: Score | None = Field(
        default=None, description="The logit difference after, with the final norm's scale held at its value before."
    )
    predicted: Prediction


class SweepRecord(_Strict):
    """Every head (and MLP) of some layers changed one at a time at a step: measured change of the logit
    difference per part, beside the breakdown's prediction for the same change."""

    step: int = Field(ge=0, lt=MAX_STEPS)
    branch: int = Field(default=0, ge=0, le=1000)
    target: TokenRef
    contrast: TokenRef
    operation: Name
    layers: list[int] = Field(max_length=1024)
    heads: list[list[Score]] = Field(max_length=1024, description="measured[layer i of layers][head]")
    mlps: list[Score] = Field(max_length=1024, description="measured per layer of layers (empty: MLPs not swept)")
    predicted_heads: list[list[Score]] | None = Field(default=None, max_length=1024)
    predicted_mlps: list[Score] | None = Field(default=None, max_length=1024)
    correlation: Score | None = None


class Trace(_Strict):
    """A whole run. Everything here is plain data: it round-trips through JSON unchanged."""

    schema_version: Literal[2] = SCHEMA_VERSION
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
    explanations: list[Explanation] = Field(default_factory=list, max_length=64, description="Saved 'Explain' results.")
    fidelity: FidelityInfo | None = Field(default=None, description="What the model's fidelity check measured.")
    interventions: list[InterventionRecord] = Field(
        default_factory=list, max_length=64, description="Saved 'What if?' results."
    )
    sweeps: list[SweepRecord] = Field(default_factory=list, max_length=16, description="Saved 'What if?' sweeps.")

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
        if self.attention is not None and self.attention.prompt_cells > t:
            raise ValueError(f"attention.prompt_cells={self.attention.prompt_cells} exceeds the {t}-token prompt")
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
        self._check_explanations(known)
        self._check_interventions(known)
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

    def _check_explanations(self, ends: dict[int, int]) -> None:
        """Each kept explanation names a step of an existing path and has the model's shape: one row of
        heads per layer, rows of one length, so its views cost what the model's shape allows."""
        t = len(self.prompt_ids)
        for i, e in enumerate(self.explanations):
            c, where = e.components, f"explanation {i}"
            if e.branch not in ends or e.step >= ends[e.branch]:
                raise ValueError(f"{where} is of step {e.step} of branch {e.branch}, which the trace does not hold")
            widths = {len(row) for row in c.heads}
            if not len(c.heads) == len(c.mlps) == len(c.attn_bias) == self.model.n_layers or len(widths) > 1:
                raise ValueError(f"{where}: its breakdown needs {self.model.n_layers} layers of equal head rows")
            if len(c.heads) * max(widths, default=0) > MAX_COMPONENT_CELLS:
                raise ValueError(f"{where}: its breakdown has over {MAX_COMPONENT_CELLS:,} layer × head cells")
            if any(not 0 <= p < t + e.step for p in e.inputs.positions):
                raise ValueError(
                    f"{where}: an input position is outside the {t + e.step} positions before step {e.step}"
                )

    def _check_interventions(self, ends: dict[int, int]) -> None:
        """Each kept intervention or sweep names a step the trace holds; a sweep has the model's shape."""
        for where, r in [(f"intervention {i}", r) for i, r in enumerate(self.interventions)] + [
            (f"sweep {i}", r) for i, r in enumerate(self.sweeps)
        ]:
            if r.branch not in ends or r.step >= ends[r.branch]:
                raise ValueError(f"{where} is of step {r.step} of branch {r.branch}, which the trace does not hold")
        for i, w in enumerate(self.sweeps):
            n = self.model.n_layers
            rows = [w.heads, *([w.predicted_heads] if w.predicted_heads is not None else [])]
            if any(not 0 <= L < n for L in w.layers) or any(len(h) != len(w.layers) for h in rows):
                raise ValueError(f"sweep {i}: its layers must be of the model's {n} and have one row each")
            if (
                len({len(r) for h in rows for r in h}) > 1
                or len(w.layers) * len(next(iter(w.heads), [])) > MAX_COMPONENT_CELLS
            ):
                raise ValueError(f"sweep {i}: head rows of unequal length, or over {MAX_COMPONENT_CELLS:,} cells")
            if w.mlps and len(w.mlps) != len(w.layers) or (w.predicted_mlps and len(w.predicted_mlps) != len(w.layers)):
                raise ValueError(f"sweep {i}: one MLP value per swept layer")

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


def dumps(trace: Trace) -> str:
    """trace.json text, checked by the same parser that reads it: the tool never writes a file it would refuse.

    Compact (no indentation): a file accepted under the size cap is written back no larger than
    admission measured it (`admission.py` measures this same text)."""
    text = trace.model_dump_json()
    parse(text)
    return text


def parse(data: bytes | str) -> Trace:
    """Validate trace.json bytes strictly in one step; any problem becomes one TraceError."""
    if len(data) > MAX_TRACE_BYTES:  # checked before parsing anything
        raise TraceError(
            f"trace is {len(data) / 2**20:.1f} MiB, over the {MAX_TRACE_BYTES / 2**20:.0f} MiB limit for traces"
        )
    if not data or not (data.strip() if isinstance(data, bytes) else data.strip()):
        raise TraceError("the file is empty: choose a trace.json written by Model Interpret Explorer")
    try:
        trace = Trace.model_validate_json(data)
    except ValidationError as exc:
        if not _is_v1(exc, data):
            raise TraceError(_describe(exc)) from None
        trace = _parse_v1(data)
    except (ValueError, RecursionError) as exc:
        raise TraceError(f"not a valid trace file: {exc}") from None
    _check_unique_keys(data)
    return trace


def _is_v1(exc: ValidationError, data: bytes | str) -> bool:
    """Did validation fail only because the file is schema 1 (upgraded by _parse_v1)?"""
    first = exc.errors(include_url=False)[0]
    return first["loc"] == ("schema_version",) and first.get("input") == 1


def _parse_v1(data: bytes | str) -> Trace:
    try:
        return Trace.model_validate(_upgrade_v1(json.loads(data)))
    except ValidationError as exc:
        raise TraceError(_describe(exc)) from None
    except (ValueError, RecursionError) as exc:
        raise TraceError(f"not a valid trace file: {exc}") from None


def _check_unique_keys(data: bytes | str) -> None:
    """The file parsed; now refuse it if an object repeats a key (the JSON parser keeps the last silently)."""
    try:
        json.loads(data, object_pairs_hook=_unique_keys)
    except DuplicateKey as exc:
        raise TraceError(str(exc)) from None


class DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """json.loads hook: a key given twice is refused instead of the last one silently winning."""
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise DuplicateKey(f"the key {k[:40]!r} appears twice in one object: the trace was edited or is corrupt")
        out[k] = v
    return out


def _upgrade_v1(obj: dict) -> dict:
    """Schema 1 differs only in its attention section: the companion (.attn.npz) held the prompt's full T×T."""
    obj = dict(obj, schema_version=2)
    attn, ids = obj.get("attention"), obj.get("prompt_ids")
    if isinstance(attn, dict) and isinstance(ids, list) and ids:
        obj["attention"] = dict(attn, prompt_cells=min(len(ids), MAX_PROMPT_TOKENS))
    return obj


def _describe(exc: ValidationError) -> str:
    errs = exc.errors(include_url=False, include_input=False)
    if any(e["type"] == "literal_error" and e["loc"] == ("schema_version",) for e in errs):
        return "unsupported schema_version: this version reads schema_version 1 and 2; update Model Interpret Explorer"
    first = errs[0]
    where = ".".join(str(p) for p in first["loc"]) or "file"
    if first["type"] == "json_invalid":
        return f"not valid JSON: {first['msg']}"
    more = f" (and {len(errs) - 1} more problems)" if len(errs) > 1 else ""
    return f"invalid trace at {where}: {first['msg']}{more}"


def json_schema() -> str:
    return json.dumps(Trace.model_json_schema(), indent=2, sort_keys=True) + "\n"

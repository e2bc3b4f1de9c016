"""The step loop: prefill once, then one cached forward per new token, recording each step.

A `Run` is iterated as a generator of StepRecords, so a caller can stream tokens, stop at any step
and still call `run.trace()` for a valid partial trace. Each step is atomic: the cache, the token
sequence and the record are all updated inside one `next()`, never half-way.

Step s works like this (T = prompt length):
  forward(token s-1) with the cache  -> logits for position T+s and the attention row of query T+s-1
  (step 0 takes both from the prefill instead)
  logits -> processing chain -> sample with this run's own torch.Generator -> record
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import json
import math
import platform
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from . import capture, fidelity, models
from . import trace as trace_format
from .attnstore import AttentionStore
from .config import GenerationConfig
from .lens import layer_logprobs
from .limits import Limits
from .models import LoadedModel
from .processors import apply_chain_staged, build_chain
from .recorder import TEMP_PREFIX, AttentionRecorder
from .tokens import vocab_for
from .trace import (
    MAX_PROMPT_TOKENS,
    AttentionInfo,
    Branch,
    Candidates,
    FidelityInfo,
    LensRecord,
    ModelInfo,
    StageTrack,
    StepRecord,
    Timing,
    Trace,
)
from .version import __version__

LN2 = math.log(2.0)
# Clean stop: the text ends with sentence-final punctuation (. ! ? …), optionally followed by closing
# quotes or brackets, and the punctuation does not follow a digit (so "1." in a list does not stop).
SENTENCE_END = re.compile(r"(?<![0-9])[.!?…][\"'”’)\]]*\s*$")
TRACE_SLACK = 16 * 1024  # trace.json bytes no step accounts for: timings, stop reason, the attention section
LONGEST_PROB = 1.2345678901234567e-05  # a float whose JSON is as long as any probability's (22 characters)


def format_prompt(tokenizer, config: GenerationConfig) -> tuple[list[int], str, bool]:
    """Prompt ids, the text they spell, and whether the chat template was applied."""
    if config.chat and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": config.prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return list(ids), text, True
    ids = list(tokenizer(config.prompt)["input_ids"])
    if not ids and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id]
    if not ids:
        raise ValueError("prompt is empty and the tokenizer has no BOS token: type a prompt")
    return ids, config.prompt, False


def eos_ids(loaded: LoadedModel) -> list[int]:
    """EOS ids as generate() sees them: the generation config's, else the tokenizer's."""
    eos = getattr(loaded.model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = loaded.tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


class Run:
    """One generation run. Iterate it to generate; `trace()` and `attention()` work at any point."""

    def __init__(
        self,
        loaded: LoadedModel,
        config: GenerationConfig,
        limits: Limits | None = None,
        attention_path: str | None = None,
        attention_dtype: str = "float16",
        check: bool = True,
    ) -> None:
        """attention_path: where the companion streams (default: a temporary folder); attention_dtype
        float16 (what is saved) or float32 (the model's exact numbers, for faithfulness checks); check:
        refuse what the model's fidelity check refused (off only for the check's own probe)."""
        self.loaded, self.config = loaded, config
        if check:
            if loaded.fidelity is None:
                check_fidelity(loaded)
            refuse_unfaithful(loaded, config)
        if limits is not None:
            limits.check_config(config)
        self.vocab = vocab_for(loaded.tokenizer)
        prompt_ids, self.input_text, self.chat_applied = format_prompt(loaded.tokenizer, config)
        self.prompt_len = t = len(prompt_ids)
        if t > MAX_PROMPT_TOKENS:  # checked now: a trace that holds more would be refused when saved
            raise ValueError(f"the prompt is {t} tokens; a trace holds at most {MAX_PROMPT_TOKENS}: shorten it")
        loaded.check_fits(
            t + config.max_new_tokens, f"the prompt ({t} tokens) plus max_new_tokens={config.max_new_tokens}"
        )
        if limits is not None:
            limits.check_run(config, t, loaded.n_layers, loaded.n_heads)
        dev = loaded.device
        self.ids = torch.zeros((1, t + config.max_new_tokens), dtype=torch.long, device=dev)  # (1, T+max)
        self.ids[0, :t] = torch.tensor(prompt_ids, dtype=torch.long)
        self.n = 0  # tokens generated so far
        self.start_step = 0  # first step this run generates (a branch starts later)
        self.eos = eos_ids(loaded)
        ws = self.vocab.whitespace_ids() if config.block_ws_steps > 0 else []
        self.chain = build_chain(config, t, self.eos, ws, device=dev)
        self.generator = torch.Generator(device=dev).manual_seed(config.seed)
        self.steps: list[StepRecord] = []
        self.recorder: AttentionRecorder | None = None  # made last, once the trace's size is known to fit
        self.error: str | None = None  # why a run stopped early other than by its rules (e.g. a full disk)
        self.stop_reason: str | None = None
        self.prefill_s = 0.0
        self.load_s = loaded.load_s  # the caller sets this run's own wait for the model (0 when it was loaded)
        # called as on_prefill(layers_done, layers, seconds) after each layer of the prefill's forward
        self.on_prefill: Callable[[int, int, float], None] | None = None
        self._cache = None
        self._uncached = False  # the model returns no cache (RWKV, RecurrentGemma): each step reruns the sequence
        self._logits: torch.Tensor | None = None  # (1, vocab) float32, for the next step
        self._pending_row: torch.Tensor | None = None  # (layers, heads, T+s) float32: next step's attention row
        self._pending_hidden: torch.Tensor | None = None  # (layers, d): next step's hidden states, for the lens
        self.forced: dict[int, int] = {}  # step -> token id the user chose (branches)
        self._ready = False  # prefilled, or given a cache
        self._text = b""  # generated bytes so far, for stop_on and clean stop
        self.created = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        # trace.json bytes the steps may still take (the fidelity probe's own runs are never saved)
        self._json_room = self._trace_room() if check else math.inf
        if config.capture_attention:
            self.recorder = self._recorder(limits, attention_path, attention_dtype)

    def _trace_room(self) -> int:
        """Bytes left for the steps under the trace size cap; refuses, before anything runs, a
        max_new_tokens whose steps could pass it, naming the largest that fits."""
        cap = trace_format.MAX_TRACE_BYTES  # read at each run (a host or a test may lower it)
        room = cap - len(self.trace().model_dump_json()) - TRACE_SLACK
        used, fits = 0, 0
        for cost in self._step_estimates():
            used += cost
            fits += used <= room
        if used > room:
            cfg = self.config
            lens = f", the logit lens over {self.loaded.n_layers} layers" if cfg.logit_lens else ""
            raise ValueError(
                f"max_new_tokens={cfg.max_new_tokens} could make a trace.json of {(cap - room + used) / 2**20:.1f} MiB "
                f"with top_n={cfg.top_n}{lens}, over the {cap / 2**20:.1f} MiB limit for traces: use "
                f"max_new_tokens={fits} or less, or lower top_n"
            )
        return room

    def _step_estimates(self) -> list[int]:
        """Compact JSON bytes each step could take: candidates, stage track and lens with the longest
        numbers and the vocabulary's mean label, its attention snapshot, and its text in the output."""
        cfg, lm = self.config, self.loaded
        label = mean_label_bytes(self.vocab)
        lens_layers = lm.n_layers if cfg.logit_lens else 0
        names = [st.name for st in self.chain]
        # after top_k at most top_k tokens keep a probability: the processed list and later stages hold fewer
        kept = [cfg.top_k if "top_k" in names[:i] else lm.vocab_size for i in range(len(names) + 1)]
        fixed = step_bytes(cfg.top_n, lm.vocab_size, lens_layers, kept, len(self.eos), label)
        fixed += 6 * label  # the token's text in output_text, each byte escaped at worst (\u00XX)
        every = cfg.attn_every if cfg.capture_attention else 0
        snap = [9 * (self.prompt_len + s) + 2 if every > 0 and s % every == 0 else 0 for s in range(cfg.max_new_tokens)]
        return [fixed + extra for extra in snap]

    def _recorder(self, limits: Limits | None, path: str | None, dtype: str) -> AttentionRecorder:
        if not capture.supports(self.loaded.model):
            raise ValueError(
                f"{self.loaded.source.name}'s attention layers do not go through transformers' attention "
                "interface, so their weights cannot be recorded: turn attention capture off"
            )
        capture.install(self.loaded.model)
        if self.config.attention_precision == "eager" and not capture.supports_eager(self.loaded.model):
            raise ValueError(
                f"{self.loaded.source.name} has no eager attention function to reproduce: "
                "set attention_precision=float32"
            )
        if path is None:
            path = tempfile.mkdtemp(prefix=TEMP_PREFIX) + "/attention.safetensors"
        budget = limits.prompt_attention_bytes() if limits is not None else None
        kw = {"prompt_budget_bytes": budget} if budget else {}
        lm = self.loaded
        recorder = AttentionRecorder(
            path, lm.n_layers, lm.n_heads, self.prompt_len, self.config.max_new_tokens, dtype, **kw
        )
        recorder.precision = self.config.attention_precision  # read by capture for half-precision models
        recorder.way = fidelity.way_of(lm)
        return recorder

    # -- the loop -------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[StepRecord]:
        if not self._ready and self.stop_reason is None:
            self.prefill()
        while self.stop_reason is None:
            yield self.step()

    @torch.inference_mode()
    def prefill(self, length: int | None = None) -> None:
        """One forward over the first `length` positions (default: the prompt)."""
        self._ready = True
        start = time.perf_counter()
        if self.recorder is not None:
            self.recorder.start_prefill(length or self.prompt_len)
        with _layer_progress(self.loaded, self.on_prefill, start):
            self._forward(self.ids[:, : length or self.prompt_len])
        if self.recorder is not None:
            self.recorder.end_prefill()
            self._pending_row = self.recorder.pending()
        self.prefill_s = time.perf_counter() - start

    def _forward(self, input_ids: torch.Tensor):
        kwargs = {"cache": self._cache} if self._cache is not None else {}
        with capture.capturing(self.recorder):  # rows go to the recorder as each layer computes them
            out = self.loaded.model(
                input_ids=input_ids,
                use_cache=not self._uncached,
                output_hidden_states=self.config.logit_lens,
                logits_to_keep=1,  # a long prompt's full logits would be T × vocab floats
                **kwargs,
            )
        self._cache = getattr(out, "cache", None)
        self._uncached = self._uncached or not hasattr(out, "cache")  # its own state is not ours to carry
        if out.hidden_states is not None:  # (layers+1) x (1, q, d): keep each layer's last position
            self._pending_hidden = torch.stack([h[0, -1] for h in out.hidden_states[1:]])
        # as generate(): float32 scores; on the ids' device (with a device map the head may sit elsewhere)
        self._logits = out.logits[:, -1, :].to(device=self.ids.device, dtype=torch.float32)
        return out

    @torch.inference_mode()
    def step(self) -> StepRecord:
        """Generate one token: forward the previous token (cached), process, sample, record."""
        if self.stop_reason is not None:
            raise RuntimeError(f"run already stopped ({self.stop_reason})")
        start = time.perf_counter()
        t, s = self.prompt_len, self.n
        if s > 0:
            if self.recorder is not None:
                self.recorder.positions = t + s  # a sliding layer's keys end here
            self._forward(self.ids[:, : t + s] if self._uncached else self.ids[:, t + s - 1 : t + s])
            if self.recorder is not None:  # (layers, heads, T+s): exactly the new query's row
                self._pending_row = self.recorder.pending()
        seq = self.ids[:, : t + s]  # processors see the whole running sequence
        raw = self._logits
        scores, staged = apply_chain_staged(self.chain, seq, raw)  # staged: stages+1 rows of (vocab,)
        probs = torch.softmax(scores, dim=-1)  # (1, vocab): sampled from, and recorded
        if s in self.forced:
            next_id = torch.tensor([self.forced[s]], device=raw.device)
        elif self.config.greedy:
            next_id = scores.argmax(dim=-1)
        else:
            next_id = torch.multinomial(probs, 1, generator=self.generator)[:, 0]
        self.ids[0, t + s] = next_id[0]
        token = int(next_id[0])
        record = self._record(s, token, raw[0], probs[0], start, staged)
        self._commit(record, token)
        return record

    def _commit(self, record: StepRecord, token: int) -> None:
        """Advance the run's state together, then decide whether it stops."""
        size = len(record.model_dump_json()) + 1 + 6 * len(self.vocab.bytes_of(token))
        if size > self._json_room:  # checked before the step is kept, so the save always fits the cap
            cap = trace_format.MAX_TRACE_BYTES / 2**20
            self.error = (
                f"step {record.step} would take trace.json past its {cap:.1f} MiB limit, so the run stopped before "
                "it: lower max_new_tokens or top_n"
            )
            self.stop_reason = "interrupted"
            return
        self._json_room -= size
        if self.recorder is not None:
            try:
                self.recorder.commit()
            except OSError as exc:  # e.g. a full disk: stop here, the steps so far stay valid
                self.error = f"could not write attention to {self.recorder.writer.path.parent}: {exc.strerror or exc}"
                self.stop_reason = "interrupted"
                return
        self.steps.append(record)
        self.n += 1
        self._text += self.vocab.bytes_of(token)
        self.stop_reason = self._why_stop(token)

    def _why_stop(self, token: int) -> str | None:
        cfg = self.config
        if token in self.eos:
            return "eos"
        if cfg.stop_on and cfg.stop_on.encode("utf-8") in self._text[-(len(cfg.stop_on.encode()) + 64) :]:
            return "stop_on"  # checks a tail window, so text spanning several tokens is found
        if self.n >= cfg.max_new_tokens:
            return "max_new_tokens"
        if cfg.clean_stop and self.n >= max(cfg.min_new_tokens, 1):
            tail = self._text[-64:].decode("utf-8", errors="ignore")
            if SENTENCE_END.search(tail) and any(c in self.vocab.label(token) for c in ".!?…"):
                return "clean_stop"
        return None

    # -- branches -------------------------------------------------------------------------------
    @classmethod
    def branch(
        cls,
        loaded: LoadedModel,
        config: GenerationConfig,
        prefix: list[int],
        token_id: int | None,
        parent: Run | None = None,
        limits: Limits | None = None,
        prompt_ids: list[int] | None = None,
        room: int | None = None,
    ) -> Run:
        """A run that replays `prefix` (tokens 0..s-1), takes `token_id` at step s (None: samples it as any
        step) and goes on generating.

        room: trace.json bytes the trace it joins may still grow by; the branch stops before a step
        that would take that trace past its size cap (admission.room).

        With a live parent run its KV cache is copied and cropped to the split; otherwise (a loaded
        trace) the prompt and prefix are prefilled in one forward. Branches record no attention, and
        sample with their own generator seeded from (seed, s, token_id).
        """
        child = cls(loaded, config.replace(capture_attention=False), limits)
        if room is not None:  # the branch record's own fields (ids, stop reason, output text) aside
            child._json_room = min(child._json_room, room - TRACE_SLACK)
        s, t = len(prefix), child.prompt_len
        if prompt_ids is not None and child.ids[0, :t].tolist() != list(prompt_ids):
            raise ValueError(
                "this model's tokenizer and chat template do not reproduce the trace's prompt, so a "
                "branch cannot continue it: use the model that made the trace"
            )
        if s >= config.max_new_tokens:
            raise ValueError(f"cannot branch at step {s}: max_new_tokens={config.max_new_tokens} are already out")
        if token_id is not None and not 0 <= token_id < len(child.vocab):
            raise ValueError(f"token id {token_id} is outside the vocabulary (0..{len(child.vocab) - 1})")
        child.ids[0, t : t + s] = torch.tensor(prefix, dtype=torch.long)
        child.n = child.start_step = s
        child._text = b"".join(child.vocab.bytes_of(i) for i in prefix)
        child.forced = {} if token_id is None else {s: int(token_id)}  # None: step s is chosen by the rules
        child.generator.manual_seed((config.seed + 1_000_003 * (s + 1) + int(token_id or -1)) % 2**63)
        if s == 0:
            child.prefill()
        elif (
            parent is not None
            and parent._cache is not None
            and parent.n >= s
            and torch.equal(parent.ids[0, : t + s], child.ids[0, : t + s])
        ):
            child._cache = _cropped(parent._cache, t + s - 1)  # None: a sliding cache past its window
            child._ready = child._cache is not None
        if not child._ready:
            child.prefill(t + s - 1)
        return child

    def branch_record(self, branch_id: int, parent_id: int) -> Branch:
        return Branch(
            id=branch_id,
            parent=parent_id,
            at_step=self.start_step,
            steps=list(self.steps),
            stop_reason=self.stop_reason or "interrupted",
            output_text=self.output_text(),
        )

    # -- recording ------------------------------------------------------------------------------
    def _record(
        self, s: int, token: int, raw: torch.Tensor, proc_p: torch.Tensor, start: float, staged: list[torch.Tensor]
    ) -> StepRecord:
        """Summarise both distributions of step s. raw: (vocab,) logits; proc_p: (vocab,) processed probabilities."""
        k = min(self.config.top_n, raw.shape[-1])
        both = torch.stack([torch.softmax(raw, -1), proc_p])  # (2, vocab): raw, processed
        raw_p = both[0]
        top = torch.topk(both, k)  # one kernel for both lists
        entropy = torch.special.entr(both).sum(-1)  # (2,) in nats
        # varentropy, Var[-log p]: log p and the raw logits differ by a constant, so two dot products do it
        centred = raw - torch.dot(raw_p, raw)  # (vocab,)
        varent = torch.dot(raw_p, centred * centred)  # nats^2
        rank = (raw > raw[token]).sum() + 1
        scalars = torch.cat([both[:, token], entropy, rank.float()[None], varent[None]]).tolist()  # one host copy
        p_raw, p_proc, h_raw, h_proc, rank_f, var_raw = scalars
        top_raw, top_proc = _Top(top.values[0], top.indices[0]), _Top(top.values[1], top.indices[1])
        snapshot = None
        if self.config.capture_attention and self.config.attn_every > 0 and s % self.config.attn_every == 0:
            snapshot = [round(v, 6) for v in self._pending_row[-1].float().mean(0).tolist()]
        return StepRecord.model_construct(
            step=s,
            position=self.prompt_len + s,
            token_id=token,
            piece=self.vocab.piece(token),
            label=self.vocab.label(token),
            p_raw=p_raw,
            p_proc=p_proc,
            rank_raw=int(rank_f),
            entropy_raw=max(h_raw / LN2, 0.0),
            entropy_proc=max(h_proc / LN2, 0.0),
            top_raw=self._candidates(top_raw),
            top_proc=self._candidates(top_proc),
            time_s=time.perf_counter() - start,
            attn_snapshot=snapshot,
            stages=self._stage_track(staged, raw_p, proc_p, top_raw.indices, top_proc.indices, token),
            lens=self._lens(token) if self.config.logit_lens else None,
            varentropy=var_raw / (LN2 * LN2) if math.isfinite(var_raw) else None,  # in bits^2
            forced=s in self.forced,
        )

    def _stage_track(
        self,
        staged: list[torch.Tensor],
        raw_p: torch.Tensor,
        proc_p: torch.Tensor,
        top_raw: torch.Tensor,
        top_proc: torch.Tensor,
        token: int,
    ) -> StageTrack:
        """Probability of the tracked candidates (both top-k lists, the chosen token, EOS) after every stage."""
        ids = list(dict.fromkeys(torch.cat([top_raw, top_proc]).tolist() + [token] + self.eos))
        idx = torch.tensor(ids, device=raw_p.device)
        # first and last rows are already normalised; only the stages in between need a logsumexp
        rows = [raw_p[idx]] + [torch.exp(r[idx] - torch.logsumexp(r, -1)) for r in staged[1:-1]]
        if len(staged) > 1:
            rows.append(proc_p[idx])
        probs = torch.stack(rows)  # (stages+1, m)
        return StageTrack.model_construct(
            stages=["raw"] + [st.name for st in self.chain],
            ids=ids,
            labels=self.vocab.labels(ids),
            probs=probs.tolist(),
        )

    def _lens(self, token: int) -> LensRecord:
        logp = layer_logprobs(self.loaded.model, self._pending_hidden)  # (layers, vocab)
        top = logp.max(dim=-1)
        ids = top.indices.tolist()
        return LensRecord.model_construct(
            top_ids=ids,
            top_labels=self.vocab.labels(ids),
            top_probs=top.values.exp().tolist(),
            chosen_probs=logp[:, token].exp().tolist(),
        )

    def _candidates(self, top) -> Candidates:
        """Top candidates with non-zero probability (a rule may leave fewer than top_n possible)."""
        pairs = [(i, p) for i, p in zip(top.indices.tolist(), top.values.tolist()) if p > 0.0]
        ids, probs = [i for i, _ in pairs], [p for _, p in pairs]
        return Candidates.model_construct(ids=ids, labels=self.vocab.labels(ids), probs=probs)

    # -- results --------------------------------------------------------------------------------
    def output_ids(self) -> list[int]:
        return self.ids[0, self.prompt_len : self.prompt_len + self.n].tolist()

    def output_text(self) -> str:
        return self.loaded.tokenizer.decode(self.output_ids(), skip_special_tokens=True)

    def trace(self, stop_reason: str | None = None) -> Trace:
        """The run so far as plain data; an unfinished run reads as `interrupted` unless told otherwise."""
        lm, cfg = self.loaded, self.config
        gen_s = self.prefill_s + sum(s.time_s for s in self.steps)
        # decoding speed: step 0 comes with the prefill, so the rate counts the cached steps after it
        # (counting the prefill made a 2-token answer to a long prompt read 0.3 tokens/s)
        decode_s = sum(s.time_s for s in self.steps[1:])
        prompt_ids = self.ids[0, : self.prompt_len].tolist()
        attn = None
        if self.recorder is not None:
            attn = AttentionInfo(
                file=None,
                layers=lm.n_layers,
                heads=lm.n_heads,
                dtype=self.recorder.shape.dtype,
                prompt_cells=self.recorder.shape.bins,
                silent_layers=self.recorder.silent_layers(),
                snapshot_layer=lm.n_layers - 1,
                snapshot_every=cfg.attn_every,
                run=self.recorder.writer.run,
            )
        return Trace(
            created=self.created,
            model=model_info(lm),
            versions=versions(),
            config=cfg.to_dict(),
            chat_applied=self.chat_applied,
            input_text=self.input_text,
            prompt_ids=prompt_ids,
            prompt_pieces=[self.vocab.piece(i) for i in prompt_ids],
            prompt_labels=self.vocab.labels(prompt_ids),
            steps=list(self.steps),
            stop_reason=stop_reason or self.stop_reason or "interrupted",
            output_text=self.output_text(),
            timing=Timing(
                load_s=self.load_s,
                prefill_s=self.prefill_s,
                generate_s=gen_s,
                tokens_per_s=(len(self.steps) - 1) / decode_s if decode_s > 0 else 0.0,
            ),
            attention=attn,
            fidelity=fidelity_info(lm),
        )

    def attention(self) -> AttentionStore | None:
        """The recorded attention so far, read lazily from the companion; None when not captured."""
        return None if self.recorder is None else self.recorder.store()


def _decoder_layers(loaded: LoadedModel) -> list:
    """The model's blocks: the first ModuleList as long as its layer count (llama's layers, GPT-2's h); a
    longest-list rule would pick a mixture-of-experts' experts. None found: no progress, same results."""
    for m in loaded.model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) == loaded.n_layers:
            return list(m)
    return []


@contextlib.contextmanager
def _layer_progress(loaded: LoadedModel, callback, start: float):
    """While a forward runs, call `callback(done, layers, seconds)` as each block finishes. The hooks sit
    on a model every session shares, so they are removed before anything else can use it."""
    if callback is None:
        yield
        return
    layers = _decoder_layers(loaded)
    handles = [
        layer.register_forward_hook(lambda *_, i=i: callback(i + 1, len(layers), time.perf_counter() - start))
        for i, layer in enumerate(layers)
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _cropped(cache, length: int):
    """A copy of a live run's cache holding its first `length` positions, or None where that cannot be
    had: a sliding-window layer that has passed its window no longer holds the earlier keys."""
    if not hasattr(cache, "crop"):
        return None
    try:
        copied = copy.deepcopy(cache)  # the parent keeps its own cache untouched
        copied.crop(-(copied.get_seq_length() - length))
    except (ValueError, RuntimeError, NotImplementedError):
        return None
    return copied if copied.get_seq_length() == length else None


def check_fidelity(lm: LoadedModel) -> LoadedModel:
    """Run (or reuse) the model's fidelity check; call it right after loading, before the model is shared."""
    lm.fidelity = fidelity.check(lm, Run)
    return lm


def refuse_unfaithful(lm: LoadedModel, config: GenerationConfig) -> None:
    """Raise, before anything runs, for a feature the model's fidelity check refused."""
    fid = lm.fidelity
    if fid is None:
        return
    wanted = [("tokens", True, ""), ("attention", config.capture_attention, ": turn attention capture off")]
    wanted.append(("lens", config.logit_lens, ": turn the logit lens off"))
    for feature, on, fix in wanted:
        reason = fid.refusal(feature) if on else None
        if reason:
            raise ValueError(reason + fix)


@dataclass
class _Top:
    """One row of a batched torch.topk result."""

    values: torch.Tensor
    indices: torch.Tensor


def mean_label_bytes(vocab) -> int:
    """Mean JSON bytes of a label over a sample of the vocabulary (2,048 ids spread over it)."""
    ids = range(0, len(vocab), max(1, len(vocab) // 2048))
    sizes = [len(json.dumps(vocab.label(i), ensure_ascii=False).encode("utf-8")) - 2 for i in ids]
    return math.ceil(sum(sizes) / max(1, len(sizes)))


def step_bytes(top_n: int, vocab_size: int, lens_layers: int, kept: list[int], eos: int, label: int) -> int:
    """Compact JSON bytes of one step record (snapshot aside) with the longest ids and numbers and labels
    of `label` bytes: the same serializer as trace.json, so field names and separators count exactly.
    kept: per stage (raw first), how many tokens at most keep a non-zero probability."""
    word, p, top = "x" * label, LONGEST_PROB, vocab_size - 1
    k, k_proc = min(top_n, vocab_size), min(top_n, vocab_size, kept[-1])  # zeros are left out of the lists
    raw = Candidates.model_construct(ids=[top] * k, labels=[word] * k, probs=[p] * k)
    proc = Candidates.model_construct(ids=[top] * k_proc, labels=[word] * k_proc, probs=[p] * k_proc)
    m = min(k + k_proc + 1 + eos, vocab_size)  # both top lists, the chosen token and EOS, without repeats
    rows = [[p] * min(n, m) + [0.0] * (m - min(n, m)) for n in kept]
    track = StageTrack.model_construct(stages=["x" * 15] * len(kept), ids=[top] * m, labels=[word] * m, probs=rows)
    layers = max(lens_layers, 1)
    lens = LensRecord.model_construct(
        top_ids=[top] * layers, top_labels=[word] * layers, top_probs=[p] * layers, chosen_probs=[p] * layers
    )
    record = StepRecord.model_construct(
        step=trace_format.MAX_STEPS - 1,
        position=trace_format.MAX_STEPS + MAX_PROMPT_TOKENS - 1,
        token_id=top,
        piece=word,
        label=word,
        p_raw=p,
        p_proc=p,
        rank_raw=vocab_size,
        entropy_raw=p,
        entropy_proc=p,
        top_raw=raw,
        top_proc=proc,
        time_s=p,
        attn_snapshot=None,
        stages=track,
        lens=lens if lens_layers else None,
        varentropy=p,
        forced=False,
    )
    return len(record.model_dump_json()) + 1  # and the comma between steps


def fidelity_info(lm: LoadedModel) -> FidelityInfo | None:
    if lm.fidelity is None:
        return None
    data = lm.fidelity.to_dict()
    data.pop("model", None)
    return FidelityInfo.model_validate(data)


def model_info(lm: LoadedModel) -> ModelInfo:
    return ModelInfo(
        name=lm.source.name,
        location=models.public_location(lm.source),  # never a path of the author's machine
        file=lm.source.gguf_file,
        dtype=lm.dtype,
        device=lm.device,
        n_layers=lm.n_layers,
        n_heads=lm.n_heads,
        vocab_size=lm.vocab_size,
        attn_implementation=capture.native_of(lm.model),
    )


def versions() -> dict[str, str]:
    import transformers

    return {
        "explorer": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
    }


def generate(loaded: LoadedModel, config: GenerationConfig) -> Run:
    """Run to completion and return the finished Run (for the CLI, tests and benchmarks)."""
    run = Run(loaded, config)
    for _ in run:
        pass
    return run

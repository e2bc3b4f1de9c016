"""A catalogue of tiny random causal LMs, one per transformers architecture, for faithfulness tests.

Every model is built offline from its config class (no hub, no weights on disk) with the byte-level BPE
tokenizer of tests/tiny.py, so vocab_size == len(tokenizer). They are 2-4 layers of hidden size 32: quick
to build and run on a CPU, yet they keep what makes capture hard: sliding or chunked windows, attention
sinks, softcaps and logit scales, parallel blocks, post norms, layers without attention, MoE.
`SPECS` describes them, `NAMES` lists the causal LMs, `make` builds one in memory, `save` writes one out.

    model, tok = make("gemma2", window=16)  # sliding layers see 16 keys; window=None: wider than any test
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from tests.tiny import train_tokenizer

POSITIONS = 2048  # max positions of every model
WIDE = 4096  # the window of window=None: wider than any test sequence
FAMILIES = frozenset(
    "sliding sinks softcap logit_scale hybrid no_attention parallel moe post_norm twice encoder_decoder".split()
)


@dataclass(frozen=True)
class Spec:
    """A tiny model: its config class (a transformers attribute name or a callable), the config fields that
    differ from the class defaults, its family tags (FAMILIES), the window `make` gives it by default (None:
    it has no windowed layers), and the config fields that hold that window."""

    name: str
    config_class: str | Callable
    overrides: dict = field(default_factory=dict)
    family: tuple[str, ...] = ()
    window: int | None = None
    window_keys: tuple[str, ...] = ()


def _spec(name: str, config_class: str, overrides: dict, family: str = "", window_keys=()) -> Spec:
    tags = tuple(family.split())
    assert set(tags) <= FAMILIES and ("sliding" in tags) == bool(window_keys), name
    return Spec(name, config_class, overrides, tags, 32 if window_keys else None, tuple(window_keys))


def _dec(layers: int = 2, **kw) -> dict:
    """Decoder fields under their Llama-style names."""
    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4)
    return base | dict(num_key_value_heads=2, max_position_embeddings=POSITIONS) | kw


def _moe(**kw) -> dict:
    return dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32) | kw


def _ssm(**kw) -> dict:
    """Mamba-2 mixer fields of the hybrids (Bamba, Falcon-H1, GraniteMoeHybrid)."""
    return dict(mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=16, mamba_chunk_size=32) | kw


def _mla(**kw) -> dict:
    """Multi-head latent attention fields (DeepSeek, MiniCPM3)."""
    return dict(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4) | kw


SW, CHUNK = ("sliding_window",), ("attention_chunk_size",)
_S, _F = "sliding_attention", "full_attention"
# fmt: off
_LIST = [
    _spec("llama", "LlamaConfig", _dec()),
    _spec("mistral", "MistralConfig", _dec(head_dim=8), "sliding", SW),
    _spec("mixtral", "MixtralConfig", _dec(num_local_experts=4, num_experts_per_tok=2), "sliding moe", SW),
    # layers from max_window_layers on slide, the ones before attend fully: full, sliding, sliding
    _spec("qwen2", "Qwen2Config", _dec(3, use_sliding_window=True, max_window_layers=1), "sliding", SW),
    _spec("qwen2_moe", "Qwen2MoeConfig", _dec(**_moe(shared_expert_intermediate_size=32)), "moe"),
    _spec("qwen3", "Qwen3Config", _dec(head_dim=8)),
    _spec("qwen3_moe", "Qwen3MoeConfig", _dec(head_dim=8, **_moe()), "moe"),
    _spec("phi3", "Phi3Config", _dec(), "sliding", SW),
    _spec("phi", "PhiConfig", _dec(), "parallel"),
    _spec("starcoder2", "Starcoder2Config", _dec(), "sliding", SW),
    _spec("gemma", "GemmaConfig", _dec(head_dim=8)),
    _spec("gemma2", "Gemma2Config", _dec(head_dim=8), "sliding softcap logit_scale post_norm", SW),
    _spec("gemma3_text", "Gemma3TextConfig", _dec(3, head_dim=8, layer_types=[_S, _S, _F]), "sliding post_norm", SW),
    _spec("cohere", "CohereConfig", _dec(), "logit_scale parallel"),
    _spec("cohere2", "Cohere2Config", _dec(4, head_dim=8), "sliding logit_scale parallel", SW),  # s, s, s, full
    _spec("olmo", "OlmoConfig", _dec()),
    _spec("olmo2", "Olmo2Config", _dec(), "post_norm"),
    _spec("olmo3", "Olmo3Config", _dec(4), "sliding post_norm", SW),  # s, s, s, full
    # chunked, chunked, chunked, full (NoPE); MoE feed-forward on every layer
    _spec("llama4_text", "Llama4TextConfig", _dec(4, head_dim=8, intermediate_size_mlp=64, num_local_experts=4),
          "sliding moe", CHUNK),
    # sliding, full; max positions kept at the default that its YaRN rope scaling (factor 32 over 4096) implies
    _spec("gpt_oss", "GptOssConfig", _dec(head_dim=8, num_local_experts=4, num_experts_per_tok=2,
                                          max_position_embeddings=131072), "sliding sinks moe", SW),
    _spec("gpt2", "GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, n_positions=POSITIONS)),
    _spec("gpt_neox", "GPTNeoXConfig", _dec(), "parallel"),
    _spec("gptj", "GPTJConfig", dict(n_embd=32, n_layer=2, n_head=4, n_positions=POSITIONS, n_inner=64, rotary_dim=4),
          "parallel"),
    _spec("bloom", "BloomConfig", dict(hidden_size=32, n_layer=2, n_head=4)),
    _spec("gpt_neo", "GPTNeoConfig", dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                                          max_position_embeddings=POSITIONS,
                                          attention_types=[[["global", "local"], 1]]), "sliding", ("window_size",)),
    _spec("falcon", "FalconConfig", _dec(), "parallel"),
    _spec("codegen", "CodeGenConfig", dict(n_embd=32, n_layer=2, n_head=4, n_positions=POSITIONS, n_ctx=POSITIONS,
                                           n_inner=64, rotary_dim=4), "parallel"),
    _spec("granite", "GraniteConfig", _dec(logits_scaling=4.0), "logit_scale"),
    _spec("granitemoe", "GraniteMoeConfig", _dec(logits_scaling=4.0, num_local_experts=4, num_experts_per_tok=2),
          "logit_scale moe"),
    _spec("diffllama", "DiffLlamaConfig", _dec(), "twice"),
    # conv, attention, conv
    _spec("lfm2", "Lfm2Config", _dec(3, full_attn_idxs=[1], block_auto_adjust_ff_dim=False), "hybrid"),
    _spec("mamba", "MambaConfig", dict(hidden_size=32, state_size=8, num_hidden_layers=2), "no_attention"),
    _spec("mamba2", "Mamba2Config", dict(hidden_size=32, num_heads=4, head_dim=16, n_groups=1, state_size=16,
                                         num_hidden_layers=2, chunk_size=32), "no_attention"),
    _spec("falcon_mamba", "FalconMambaConfig", dict(hidden_size=32, state_size=8, num_hidden_layers=2), "no_attention"),
    _spec("rwkv", "RwkvConfig", dict(hidden_size=32, num_hidden_layers=2, context_length=POSITIONS), "no_attention"),
    _spec("bamba", "BambaConfig", _dec(attn_layer_indices=[1], **_ssm()), "hybrid"),  # mamba, attention
    # every layer runs attention and a Mamba-2 mixer side by side (so not "hybrid"); lm_head_multiplier scales logits
    _spec("falcon_h1", "FalconH1Config", _dec(head_dim=8, mamba_d_ssm=64, lm_head_multiplier=0.5, **_ssm()),
          "logit_scale"),
    # mamba, attention + MoE, mamba, attention + MoE
    _spec("jamba", "JambaConfig", _dec(4, attn_layer_period=2, attn_layer_offset=1, num_experts=4, mamba_d_state=8),
          "hybrid moe"),
    # recurrent, recurrent, local attention; final logits softcapped
    _spec("recurrent_gemma", "RecurrentGemmaConfig", _dec(3, head_dim=8, num_key_value_heads=1, lru_width=32),
          "hybrid sliding logit_scale", ("attention_window_size",)),
    _spec("stablelm", "StableLmConfig", _dec()),
    _spec("opt", "OPTConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                                   word_embed_proj_dim=32, max_position_embeddings=POSITIONS)),
    _spec("exaone4", "Exaone4Config", _dec(4), "sliding post_norm", SW),  # s, s, s, full
    _spec("smollm3", "SmolLM3Config", _dec()),
    _spec("helium", "HeliumConfig", _dec(head_dim=8)),
    _spec("glm", "GlmConfig", _dec(head_dim=8)),
    _spec("glm4", "Glm4Config", _dec(head_dim=8), "post_norm"),
    _spec("mpt", "MptConfig", dict(d_model=32, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=POSITIONS)),
    _spec("persimmon", "PersimmonConfig", _dec()),
    _spec("phimoe", "PhimoeConfig", _dec(num_local_experts=4), "sliding moe", SW),
    _spec("olmoe", "OlmoeConfig", _dec(num_experts=4, num_experts_per_tok=2), "moe"),
    _spec("flex_olmo", "FlexOlmoConfig", _dec(num_experts=4, num_experts_per_tok=2), "moe post_norm"),
    _spec("nemotron", "NemotronConfig", _dec(head_dim=8)),
    _spec("ernie4_5", "Ernie4_5Config", _dec(head_dim=8)),
    _spec("arcee", "ArceeConfig", _dec(head_dim=8)),
    _spec("apertus", "ApertusConfig", _dec(head_dim=8, max_position_embeddings=65536)),  # llama3 rope from 8192
    _spec("seed_oss", "SeedOssConfig", _dec(head_dim=8)),
    _spec("hunyuan_v1_dense", "HunYuanDenseV1Config", _dec(head_dim=8)),
    _spec("bitnet", "BitNetConfig", _dec()),
    _spec("ministral", "MinistralConfig", _dec(head_dim=8), "sliding", SW),
    _spec("vaultgemma", "VaultGemmaConfig", _dec(head_dim=8), "sliding softcap logit_scale", SW),  # sliding, full
    # the last two layers reuse the keys and values of earlier ones (num_kv_shared_layers); AltUp, LAuReL
    _spec("gemma3n_text", "Gemma3nTextConfig", _dec(4, head_dim=8, hidden_size_per_layer_input=8, laurel_rank=8,
                                                    num_kv_shared_layers=2, altup_num_inputs=2,
                                                    vocab_size_per_layer_input=300, layer_types=[_S, _F] * 2),
          "sliding logit_scale post_norm", SW),
    _spec("gemma4_text", "Gemma4TextConfig", _dec(4, head_dim=8, hidden_size_per_layer_input=8,
                                                  vocab_size_per_layer_input=300, final_logit_softcapping=30.0,
                                                  layer_types=[_S, _S, _S, _F]), "sliding logit_scale post_norm", SW),
    _spec("afmoe", "AfmoeConfig", _dec(4, head_dim=8, global_attn_every_n_layers=2, num_dense_layers=1,
                                       num_shared_experts=1, **_moe()), "sliding moe post_norm", SW),
    _spec("cohere2_moe", "Cohere2MoeConfig", _dec(4, head_dim=8, num_experts=4), "sliding logit_scale moe", SW),
    _spec("glm4_moe", "Glm4MoeConfig", _dec(head_dim=8, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                                            moe_intermediate_size=32, first_k_dense_replace=1), "moe"),
    # DbrxAttentionConfig declares no rope_theta, yet DbrxAttention reads it: pass it explicitly
    _spec("dbrx", "DbrxConfig", dict(d_model=32, n_heads=4, n_layers=2, max_seq_len=POSITIONS,
                                     attn_config=dict(kv_n_heads=2, clip_qkv=8.0, rope_theta=10000.0),
                                     ffn_config=dict(ffn_hidden_size=64, moe_num_experts=4, moe_top_k=2)), "moe"),
    _spec("deepseek_v2", "DeepseekV2Config", _dec(**_mla(v_head_dim=8), moe_intermediate_size=32, n_routed_experts=4,
                                                  n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1),
          "moe"),
    _spec("deepseek_v3", "DeepseekV3Config", _dec(**_mla(v_head_dim=8), moe_intermediate_size=32, n_routed_experts=4,
                                                  num_experts_per_tok=2, n_group=1, topk_group=1,
                                                  first_k_dense_replace=1), "moe"),
    _spec("minicpm3", "MiniCPM3Config", _dec(**_mla(v_head_dim=8), dim_model_base=16), "logit_scale"),
    _spec("qwen3_next", "Qwen3NextConfig", _dec(head_dim=8, linear_key_head_dim=8, linear_value_head_dim=8,
                                                linear_num_key_heads=2, linear_num_value_heads=4,
                                                shared_expert_intermediate_size=32,
                                                layer_types=["linear_attention", _F], **_moe()), "hybrid moe"),
    _spec("qwen3_5_text", "Qwen3_5TextConfig", _dec(head_dim=8, linear_key_head_dim=8, linear_value_head_dim=8,
                                                    linear_num_key_heads=2, linear_num_value_heads=4,
                                                    layer_types=["linear_attention", _F]), "hybrid"),
    _spec("olmo_hybrid", "OlmoHybridConfig", _dec(linear_key_head_dim=8, linear_value_head_dim=8,
                                                  linear_num_key_heads=2, linear_num_value_heads=4,
                                                  layer_types=["linear_attention", _F]),
          "hybrid post_norm"),
    _spec("minimax", "MiniMaxConfig", _dec(head_dim=8, num_local_experts=4, block_size=32,
                                           layer_types=["linear_attention", _F]), "hybrid moe"),
    _spec("granitemoehybrid", "GraniteMoeHybridConfig", _dec(layer_types=["mamba", "attention"], logits_scaling=4.0,
                                                             num_local_experts=4, shared_intermediate_size=32,
                                                             **_ssm()),
          "hybrid moe logit_scale"),
    _spec("lfm2_moe", "Lfm2MoeConfig", _dec(3, layer_types=["conv", _F, "conv"], num_dense_layers=1, **_moe()),
          "hybrid moe"),
    # mamba, mamba + shared attention block, mamba
    _spec("zamba2", "Zamba2Config", _dec(3, layers_block_type=["mamba", "hybrid", "mamba"], mamba_d_state=16,
                                         n_mamba_heads=4, mamba_headdim=16, chunk_size=32, adapter_rank=8), "hybrid"),
    _spec("nemotron_h", "NemotronHConfig", _dec(3, head_dim=8, layers_block_type=["mamba", "attention", "mlp"],
                                                ssm_state_size=16, mamba_num_heads=4, mamba_head_dim=16, n_groups=1,
                                                chunk_size=32), "hybrid"),
    _spec("gpt_bigcode", "GPTBigCodeConfig", dict(n_embd=32, n_layer=2, n_head=4, n_positions=POSITIONS, n_inner=64)),
    _spec("biogpt", "BioGptConfig", _dec()),
    _spec("xglm", "XGLMConfig", dict(d_model=32, num_layers=2, attention_heads=4, ffn_dim=64,
                                     max_position_embeddings=POSITIONS)),
    # encoder-decoders: not causal LMs (not in NAMES), here so tests can check that they are refused
    _spec("t5", "T5Config", dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4), "encoder_decoder"),
    _spec("bart", "BartConfig", dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                     max_position_embeddings=POSITIONS), "encoder_decoder"),
]
# fmt: on
SPECS: dict[str, Spec] = {s.name: s for s in _LIST}
NAMES: list[str] = [s.name for s in _LIST if "encoder_decoder" not in s.family]


@functools.cache
def _tokenizer():
    return train_tokenizer()


def config(name: str, window: int | None = 32):
    """The config of the tiny `name` model, every window field of it set to `window` (None: WIDE)."""
    spec, tok = SPECS[name], _tokenizer()
    kw = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    kw |= dict(pad_token_id=tok.pad_token_id) | spec.overrides
    if "encoder_decoder" in spec.family:
        kw["decoder_start_token_id"] = tok.pad_token_id
    kw |= dict.fromkeys(spec.window_keys, WIDE if window is None else window)
    cls = getattr(transformers, spec.config_class) if isinstance(spec.config_class, str) else spec.config_class
    return cls(**kw)


def make(name: str, window: int | None = 32, seed: int = 0):
    """(model, tokenizer): the tiny `name` model, eval mode, float32, with the attention implementation
    transformers picks by default, and a copy of the shared tokenizer."""
    cfg = config(name, window)
    auto = AutoModelForSeq2SeqLM if "encoder_decoder" in SPECS[name].family else AutoModelForCausalLM
    torch.manual_seed(seed)
    model = auto.from_config(cfg).float().eval()
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight is not embed.weight:
        with torch.no_grad():  # sharpen the random logits a little so sampling is not uniform (as tiny.py)
            head.weight.mul_(8.0)
    return model, copy.deepcopy(_tokenizer())


def save(name: str, folder: Path, window: int | None = 32, seed: int = 0) -> Path:
    """Write the tiny `name` model and its tokenizer to folder (safetensors); return the folder."""
    model, tok = make(name, window, seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder

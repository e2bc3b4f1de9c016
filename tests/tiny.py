"""Tiny random models for offline tests: a byte-level BPE tokenizer trained in memory, plus
Llama- and GPT-2-shaped models built from configs and saved as local folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CORPUS = [
    "The sky is blue because air scatters blue light more than red light.",
    "Cats and dogs are friends. Birds sing in the morning! Why is the sea salty?",
    "def add(a, b):\n    return a + b\n",
    "Numbers: 1. one 2. two 3. three. Café, naïve, 東京, emoji 🙂 and tabs\tend.",
] * 20
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build(kind: str, folder: Path, seed: int = 0, positions: int = 512) -> Path:
    """Save a tiny random model of `kind` ('llama' or 'gpt2') with the in-memory tokenizer to folder."""
    tok = train_tokenizer()
    torch.manual_seed(seed)
    common = dict(vocab_size=len(tok), eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    if kind == "llama":
        cfg = LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=positions,
            **common,
        )
        model = LlamaForCausalLM(cfg)
    elif kind == "gpt2":
        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=positions, **common)
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}: use 'llama' or 'gpt2'")
    with torch.no_grad():  # sharpen the random logits a little so sampling is not uniform
        model.get_output_embeddings().weight.mul_(8.0)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def eager_attentions(lm, ids: torch.Tensor) -> np.ndarray:
    """(layers, heads, q, keys) float32 from one uncached eager forward: the reference every capture test uses.

    The model is switched to eager for the call and back to what it had after.
    """
    before = lm.model.config._attn_implementation
    lm.model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            out = lm.model(ids, output_attentions=True, use_cache=False)
        return torch.stack([a[0] for a in out.attentions]).float().numpy()
    finally:
        lm.model.set_attn_implementation(before)

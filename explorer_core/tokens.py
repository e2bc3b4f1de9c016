"""Readable labels for tokenizer pieces: `␣` for spaces, `↵` for newlines, byte-fallback decoded.

A piece's raw bytes are recovered per tokenizer family (byte-level BPE like GPT-2 and SmolLM2, or
SentencePiece with `▁` and `<0x0A>` byte fallback); pieces that hold only part of a UTF-8 character
are shown as their hex bytes, e.g. `⟨e2 80⟩`, so no label is ever a replacement character.
"""

from __future__ import annotations

import re
import threading
import unicodedata
import weakref
from functools import lru_cache

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_VISIBLE = str.maketrans({" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"})


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode table: printable stand-in character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def piece_bytes(piece: str, byte_level: bool) -> bytes:
    """The bytes a piece stands for."""
    m = _BYTE_FALLBACK.match(piece)
    if m:
        return bytes([int(m.group(1), 16)])
    if byte_level:
        dec = _byte_decoder()
        if all(ch in dec for ch in piece):
            return bytes(dec[ch] for ch in piece)
    return piece.replace("▁", " ").encode("utf-8")


def readable(raw: bytes) -> str:
    """A one-line label for the bytes: whitespace made visible, partial UTF-8 shown as hex."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "⟨" + " ".join(f"{b:02x}" for b in raw) + "⟩"
    if not text:
        return "∅"
    text = text.translate(_VISIBLE)
    # other control characters would be invisible or break a line: show them as escapes
    return "".join(f"\\x{ord(c):02x}" if unicodedata.category(c) == "Cc" else c for c in text)


class Vocab:
    """Per-tokenizer table of pieces, bytes and labels, built once (the tokenizer itself stays shared)."""

    def __init__(self, tokenizer) -> None:
        size = len(tokenizer)
        self.pieces: list[str] = [p if p is not None else "" for p in tokenizer.convert_ids_to_tokens(range(size))]
        self.special: set[int] = set(tokenizer.all_special_ids)
        self.byte_level = self._is_byte_level(self.pieces)
        self._labels: dict[int, str] = {}
        self._bytes: dict[int, bytes] = {}
        self._ws: list[int] | None = None

    @staticmethod
    def _is_byte_level(pieces: list[str]) -> bool:
        # byte-level BPE writes a leading space as "Ġ" and never uses SentencePiece's "▁"
        return any(p.startswith("Ġ") for p in pieces[:5000]) and not any(p.startswith("▁") for p in pieces[:5000])

    def __len__(self) -> int:
        return len(self.pieces)

    def piece(self, token_id: int) -> str:
        return self.pieces[token_id] if 0 <= token_id < len(self.pieces) else f"<id {token_id}>"

    def bytes_of(self, token_id: int) -> bytes:
        if token_id not in self._bytes:
            if token_id in self.special or not 0 <= token_id < len(self.pieces):
                self._bytes[token_id] = b""
            else:
                self._bytes[token_id] = piece_bytes(self.pieces[token_id], self.byte_level)
        return self._bytes[token_id]

    def label(self, token_id: int) -> str:
        if token_id not in self._labels:
            if token_id in self.special:
                self._labels[token_id] = self.piece(token_id)
            else:
                self._labels[token_id] = readable(self.bytes_of(token_id))
        return self._labels[token_id]

    def labels(self, ids) -> list[str]:
        return [self.label(int(i)) for i in ids]

    def whitespace_ids(self) -> list[int]:
        """Ids of tokens whose text is whitespace only (spaces, newlines, tabs), specials excluded.

        Scans the whole vocabulary once; later runs with the same tokenizer reuse the list."""
        if self._ws is not None:
            return self._ws
        out = []
        for i in range(len(self.pieces)):
            if i in self.special:
                continue
            raw = self.bytes_of(i)
            if raw and raw.strip(b" \t\n\r\x0b\x0c") == b"":
                out.append(i)
        self._ws = out
        return out


_VOCABS: weakref.WeakKeyDictionary = None  # type: ignore[assignment]
_VOCAB_LOCK = threading.Lock()


def vocab_for(tokenizer) -> Vocab:
    """One Vocab per tokenizer object, built on first use (its label cache fills deterministically)."""
    global _VOCABS
    with _VOCAB_LOCK:
        if _VOCABS is None:
            _VOCABS = weakref.WeakKeyDictionary()
        vocab = _VOCABS.get(tokenizer)
        if vocab is None:
            vocab = _VOCABS[tokenizer] = Vocab(tokenizer)
        return vocab

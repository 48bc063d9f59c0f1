"""Character-level text data: a tokenizer, the embedded default corpus (the English text of
Python's documentation topics, ``pydoc_data.topics``, shipped with the standard library, ~465 KB)
and a loader for any UTF-8 text file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["CharTokenizer", "Corpus", "pydoc_corpus", "load_text_file", "split_text"]

UNKNOWN = "\ufffd"


class CharTokenizer:
    """One id per character. Id 0 is reserved for characters outside the vocabulary.

    Build it from text with :meth:`from_text`; ``encode`` maps unknown characters to id 0
    (decoded as U+FFFD) unless ``strict=True``, which raises ``ValueError`` instead.
    """

    def __init__(self, chars: str):
        if not isinstance(chars, str) or not chars:
            raise ValueError("chars must be a non-empty string of distinct characters")
        if len(set(chars)) != len(chars) or UNKNOWN in chars:
            raise ValueError("chars must be distinct and must not contain U+FFFD")
        self.itos = UNKNOWN + chars
        self.stoi = {c: i for i, c in enumerate(self.itos)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text) - {UNKNOWN})))

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str, *, strict: bool = False) -> Tensor:
        """``text`` -> ``(len(text),)`` int64 ids."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if strict:
            missing = sorted(set(text) - set(self.stoi))
            if missing:
                raise ValueError(f"characters outside the vocabulary: {missing[:10]!r}")
        return torch.tensor([self.stoi.get(c, 0) for c in text], dtype=torch.long)

    def decode(self, ids: Tensor | list[int]) -> str:
        """``(L,)`` ids -> text."""
        values = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        bad = [i for i in values if not 0 <= i < len(self.itos)]
        if bad:
            raise ValueError(f"token ids must be in [0, {len(self.itos)}), got {bad[:5]}")
        return "".join(self.itos[i] for i in values)


@dataclass
class Corpus:
    """Train/validation text with its tokenizer and encoded ids."""

    name: str
    train_text: str
    val_text: str
    tokenizer: CharTokenizer

    @property
    def train_ids(self) -> Tensor:
        return self.tokenizer.encode(self.train_text)

    @property
    def val_ids(self) -> Tensor:
        return self.tokenizer.encode(self.val_text)


def split_text(text: str, val_fraction: float = 0.1, name: str = "text") -> Corpus:
    """The last ``val_fraction`` of ``text`` (contiguous) is validation; the tokenizer covers
    both parts."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(text) < 1000:
        raise ValueError(f"corpus {name!r} has {len(text)} characters; need at least 1000")
    cut = int(len(text) * (1.0 - val_fraction))
    return Corpus(name, text[:cut], text[cut:], CharTokenizer.from_text(text))


def pydoc_corpus(val_fraction: float = 0.1) -> Corpus:
    """Python's documentation topics (stdlib ``pydoc_data.topics``), topics in sorted order."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # some distributions split pydoc_data out of the stdlib
        raise RuntimeError(
            "pydoc_data is not available in this Python; pass a text file instead"
        ) from e
    text = "\n\n".join(topics[key].strip() for key in sorted(topics))
    return split_text(text, val_fraction, name="pydoc_data.topics")


def load_text_file(path: str | Path, val_fraction: float = 0.1) -> Corpus:
    """Read a UTF-8 text file (plain text only; nothing in it is executed) as a corpus."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"text file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not valid UTF-8 text: {e}") from e
    return split_text(text, val_fraction, name=path.name)

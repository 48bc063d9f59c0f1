"""Language modelling on attnkit: character data and the decoding experiment."""

from .text import CharTokenizer, Corpus, load_text_file, pydoc_corpus, split_text

__all__ = ["CharTokenizer", "Corpus", "load_text_file", "pydoc_corpus", "split_text"]

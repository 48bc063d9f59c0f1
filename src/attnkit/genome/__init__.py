"""Whole genomes with sparse attention: FASTA/GenBank reading, a base-level transformer with a
window + exponential + global-hub pattern, masked-base training, Markov baselines, and a
synthetic genome with planted long-range structure."""

from __future__ import annotations

from .embedded import (
    EMBEDDED_GENOME_ACCESSION,
    EMBEDDED_GENOME_LENGTH,
    embedded_genome,
    embedded_genome_path,
)
from .fasta import (
    MASK_TOKEN,
    N_TOKEN,
    VOCAB_SIZE,
    FastaRecord,
    decode,
    encode,
    read_fasta,
    read_genbank,
    reverse_complement,
    write_fasta,
)
from .markov import MarkovModel, markov_baselines
from .model import GenomeEncoder, GenomePattern
from .synthetic import HubTask
from .train import bits_per_base, train_labels, train_mlm

__all__ = [
    "FastaRecord",
    "read_fasta",
    "read_genbank",
    "write_fasta",
    "encode",
    "decode",
    "reverse_complement",
    "N_TOKEN",
    "MASK_TOKEN",
    "VOCAB_SIZE",
    "GenomeEncoder",
    "GenomePattern",
    "train_mlm",
    "train_labels",
    "bits_per_base",
    "MarkovModel",
    "markov_baselines",
    "HubTask",
    "embedded_genome",
    "embedded_genome_path",
    "EMBEDDED_GENOME_ACCESSION",
    "EMBEDDED_GENOME_LENGTH",
]

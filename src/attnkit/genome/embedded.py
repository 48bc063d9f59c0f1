"""The genome shipped inside the package: *Mycoplasma genitalium* G37 (RefSeq NC_000908.2,
assembly GCF_000027325.1, 580,076 bp, GC 31.7%, public NCBI data; see ``DATA.md`` here).

It is the default genome of the ``genome`` experiment, so the report measures a real whole
genome without any download. Stored as the unchanged NCBI FASTA compressed with ``gzip -9``
(156 KB); :func:`attnkit.genome.read_fasta` reads it like any gzip FASTA.
"""

from __future__ import annotations

from pathlib import Path

from .fasta import FastaRecord, read_fasta

__all__ = ["EMBEDDED_GENOME_ACCESSION", "EMBEDDED_GENOME_LENGTH", "embedded_genome",
           "embedded_genome_path"]

#: RefSeq accession of the embedded chromosome.
EMBEDDED_GENOME_ACCESSION = "NC_000908.2"
#: Its documented length in bases.
EMBEDDED_GENOME_LENGTH = 580_076
_FILE = "M_genitalium_G37_NC_000908.2.fna.gz"


def embedded_genome_path() -> Path:
    """Path of the embedded gzip FASTA (inside the installed package)."""
    path = Path(__file__).with_name(_FILE)
    if not path.is_file():  # a broken install (package data left out), not a user error
        raise FileNotFoundError(f"{path}: the embedded genome is missing from this install "
                                "(reinstall attnkit; pyproject's package-data must list *.gz)")
    return path


def embedded_genome() -> list[FastaRecord]:
    """The embedded genome's records (one: the 580,076-base chromosome NC_000908.2)."""
    return read_fasta(embedded_genome_path())

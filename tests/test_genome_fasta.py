"""FASTA / GenBank reading, encoding, reverse complement."""

from __future__ import annotations

import gzip
import math
import os
import random
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnkit.genome import (
    FastaRecord,
    decode,
    encode,
    read_fasta,
    read_genbank,
    reverse_complement,
    write_fasta,
)

GENOME = "genomes/Mycoplasma_genitalium_GCF_000027325.1.fna"


def _random_record(rng: random.Random, name: str) -> FastaRecord:
    n = rng.randint(1, 300)
    seq = "".join(rng.choice("ACGTACGTACGTNRYKM") for _ in range(n))
    seq = seq[: n // 3] + "N" * rng.randint(0, 20) + seq[n // 3 :]  # an N run
    soft = np.array([rng.random() < 0.2 for _ in seq])
    return FastaRecord(name, f"desc of {name}", seq, soft)


@pytest.mark.parametrize("suffix", [".fa", ".fa.gz"])
def test_round_trip_several_records(tmp_path, suffix):
    rng = random.Random(0)
    recs = [_random_record(rng, f"chr{i}") for i in range(4)]
    path = tmp_path / f"g{suffix}"
    write_fasta(recs, path, width=37)
    back = read_fasta(path)
    assert [r.name for r in back] == [r.name for r in recs]
    for a, b in zip(recs, back):
        assert a.description == b.description
        assert a.sequence == b.sequence  # N runs and IUPAC codes kept, not dropped
        np.testing.assert_array_equal(a.soft_mask, b.soft_mask)


def test_case_whitespace_comments_and_n_mask(tmp_path):
    path = tmp_path / "x.fa"
    path.write_bytes(b"; a comment\r\n>s1 first one\r\nacgtNN\r\n  NNa cG\r\n\r\n>s2\nUUAA\n")
    r1, r2 = read_fasta(path)
    assert (r1.name, r1.description, r1.sequence) == ("s1", "first one", "ACGTNNNNACG")
    assert r1.soft_mask.tolist() == [True] * 4 + [False] * 4 + [True, True, False]
    assert r1.n_mask.tolist() == [False] * 4 + [True] * 4 + [False] * 3
    assert r1.n_runs() == [(4, 8)]
    assert r2.sequence == "UUAA" and encode(r2.sequence).tolist() == [3, 3, 0, 0]


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"", "empty file"),
        (b"   \n\n", "empty file"),
        (b"ACGT\n>x\nACGT\n", ":1: sequence data before the first '>'"),
        (b">x\nACGT\nACXT\n", ":3:3: character 'X'"),
        (b">x\nAC-T\n", ":2:3: character '-'"),
        (b">x\n>y\nACGT\n", ":1: record 'x' has no sequence"),
        (b">\nACGT\n", ":1: header line has no name"),
        (b">x\nAC\xff\x00GT\n", ":2: binary or non-ASCII"),
        (b"\x1f\x8b\x08\x00garbage", "corrupt gzip"),
        (bytes(range(256)), "binary or non-ASCII"),
    ],
)
def test_errors_name_file_and_line(tmp_path, content, fragment):
    path = tmp_path / "bad.fa"
    path.write_bytes(content)
    with pytest.raises(ValueError) as e:
        read_fasta(path)
    assert str(path) in str(e.value) and fragment in str(e.value)


def test_shorter_than_window_names_record_line(tmp_path):
    path = tmp_path / "short.fa"
    path.write_text(">long\n" + "A" * 100 + "\n>short\nACGT\n")
    with pytest.raises(ValueError, match=r"short\.fa:3: record 'short' has 4 bases, shorter"):
        read_fasta(path, min_length=50)
    assert len(read_fasta(path, min_length=4)) == 2


def test_missing_file_is_value_error(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        read_fasta(tmp_path / "nope.fa")


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=400), gz=st.booleans(), header=st.booleans())
def test_fuzz_random_bytes_raise_value_error_only(tmp_path, data, gz, header):
    raw = (b">r\n" + data) if header else data
    path = tmp_path / "fuzz.fa"
    path.write_bytes(gzip.compress(raw) if gz else raw)
    try:
        recs = read_fasta(path)
    except ValueError:
        return
    for r in recs:  # whatever parses is valid sequence
        assert len(r.sequence) == len(r.soft_mask) > 0
        encode(r.sequence)


def test_encode_decode_and_errors():
    assert encode("ACGTNacgtnRYU").tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 4, 4, 3]
    assert decode(encode("ACGTN")) == "ACGTN"
    with pytest.raises(ValueError, match="position 2"):
        encode("AC!T")
    with pytest.raises(TypeError):
        encode(123)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        decode(torch.tensor([0, 7]))


def test_reverse_complement():
    assert reverse_complement("ACGTN") == "NACGT"
    assert reverse_complement("aAcRYkm") == "kmRYgTt"
    rng = random.Random(1)
    s = "".join(rng.choice("ACGTRYSWKMBDHVNacgtn") for _ in range(200))
    assert reverse_complement(reverse_complement(s)) == s
    t = "".join(rng.choice("ACGTN") for _ in range(50))
    assert torch.equal(reverse_complement(encode(t)), encode(reverse_complement(t)))
    with pytest.raises(ValueError):
        reverse_complement("ACXT")


def test_read_genbank(tmp_path):
    gb = (
        "LOCUS       TEST1   20 bp    DNA\nDEFINITION  a test.\nFEATURES   Location\n"
        "ORIGIN\n        1 acgtacgtac gtacgtnnnn\n//\n"
        "LOCUS       TEST2   4 bp    DNA\nORIGIN\n        1 ttaa\n//\n"
    )
    path = tmp_path / "t.gb"
    path.write_text(gb)
    a, b = read_genbank(path)
    assert (a.name, a.description, a.sequence) == ("TEST1", "a test.", "ACGTACGTACGTACGTNNNN")
    assert b.sequence == "TTAA"
    path.write_text("LOCUS X\nORIGIN\n   1 acgt\n")
    with pytest.raises(ValueError, match="not closed"):
        read_genbank(path)


def test_real_genome(shared_data):
    path = shared_data / GENOME
    if not path.exists():
        pytest.skip("M. genitalium genome not present")
    (rec,) = read_fasta(path)
    assert len(rec) == 580_076
    tok = encode(rec.sequence)
    gc = float(((tok == 1) | (tok == 2)).float().mean())
    assert math.isclose(gc, 0.317, abs_tol=0.01)  # M. genitalium is AT rich (31.7% GC)


def test_join_records_separates_with_n():
    from attnkit.genome.fasta import join_records

    recs = [FastaRecord("a", "", "ACG", np.zeros(3, bool)),
            FastaRecord("b", "", "TT", np.zeros(2, bool))]
    assert join_records(recs, 2).tolist() == [0, 1, 2, 4, 4, 3, 3]
    with pytest.raises(ValueError):
        join_records([], 2)


# ------------------------------------------------------------- issue 17: bounded reading


def test_directory_is_immediate_value_error(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        read_fasta(tmp_path)
    with pytest.raises(ValueError, match="is a directory"):
        read_genbank(tmp_path)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, None])
def test_max_bases_must_be_positive_int(tmp_path, bad):
    path = tmp_path / "x.fa"
    path.write_text(">x\nACGT\n")
    with pytest.raises(ValueError, match="max_bases"):
        read_fasta(path, max_bases=bad)


def test_max_bases_counts_all_records(tmp_path):
    path = tmp_path / "x.fa"
    path.write_text(">a\nACGT\nAC\n>b\nACGTA\n")
    assert sum(len(r) for r in read_fasta(path, max_bases=11)) == 11
    with pytest.raises(ValueError, match=r"x\.fa:5: more than max_bases=10"):
        read_fasta(path, max_bases=10)


def test_plain_file_too_large_refused_before_reading(tmp_path):
    path = tmp_path / "big.fa"
    path.write_bytes(b">x\n" + b"A" * (3 << 20) + b"\n")  # 3 MiB of text
    with pytest.raises(ValueError, match="max_bases=1000"):
        read_fasta(path, max_bases=1000)  # 2 * 1000 + 1 MiB allowed


def _gzip_of_repeats(head: bytes, unit: bytes, total: int) -> bytes:
    """gzip of ``head + unit * (total // len(unit))`` without holding the expansion."""
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [comp.compress(head)]
    block = unit * ((1 << 20) // len(unit))
    for _ in range(total // len(block)):
        parts.append(comp.compress(block))
    parts.append(comp.flush())
    return b"".join(parts)


@pytest.mark.parametrize("unit", [b"A", b"ACGT" * 15 + b"\n"])
def test_gzip_bomb_refused_with_bounded_memory(tmp_path, unit):
    """~256 KB of gzip expanding to 256 MB (one line, or 60-base lines): refused by the
    default max_bases, naming it, without holding the expansion (was 1.2 GB peak RSS)."""
    path = tmp_path / "bomb.fa.gz"
    path.write_bytes(_gzip_of_repeats(b">x\n", unit, 256 << 20))
    assert path.stat().st_size < (1 << 20)
    code = (
        "import resource, sys\n"
        "from attnkit.genome import read_fasta\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        f"    read_fasta({str(path)!r})\n"
        "    print('ACCEPTED')\n"
        "except ValueError as e:\n"
        "    print('ValueError', e)\n"
        "print('delta_mb', (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stderr
    assert "ValueError" in res.stdout and "max_bases=" in res.stdout, res.stdout
    delta = float(res.stdout.split("delta_mb")[1])
    assert delta < 600, res.stdout  # the default limit's worth of bases (128 MiB), not 1.2 GB


def test_gzip_bomb_bounded_by_small_max_bases(tmp_path):
    path = tmp_path / "bomb.fa.gz"
    path.write_bytes(_gzip_of_repeats(b">x\n", b"ACGT" * 15 + b"\n", 16 << 20))
    with pytest.raises(ValueError, match="max_bases=100000"):
        read_fasta(path, max_bases=100_000)
    with pytest.raises(ValueError, match="max_bases=100000"):  # one endless line
        path.write_bytes(_gzip_of_repeats(b">x\n", b"A", 16 << 20))
        read_fasta(path, max_bases=100_000)


def test_multi_member_gzip_and_line_ends(tmp_path):
    path = tmp_path / "two.fa.gz"
    path.write_bytes(gzip.compress(b">a\r\nAC\r\n") + gzip.compress(b"GT\n>b\rTT\r"))
    a, b = read_fasta(path)
    assert (a.name, a.sequence, b.name, b.sequence) == ("a", "ACGT", "b", "TT")


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet="AC>x \r\n;", max_size=60), chunk=st.integers(1, 7),
       gz=st.booleans())
def test_streamed_lines_match_splitlines_across_chunks(tmp_path, monkeypatch, text, chunk, gz):
    """Lines (and their numbers) do not depend on where the read chunks end."""
    from attnkit.genome import fasta

    monkeypatch.setattr(fasta, "_READ_CHUNK", chunk)
    path = tmp_path / "lines.txt"
    raw = text.encode("ascii")
    path.write_bytes(gzip.compress(raw) if gz else raw)
    got = list(fasta._text_lines(path, 1000, 2))
    assert got == [(i + 1, line.encode("ascii")) for i, line in enumerate(text.splitlines())]

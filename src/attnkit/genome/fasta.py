"""Reading genomes: FASTA (plain or gzip) and, optionally, the sequence of a GenBank flat file.

Sequences keep every base: IUPAC ambiguity codes and ``N`` runs stay in the string and are
exposed as masks, never dropped, so coordinates always match the file. Errors name the file and
line. Token ids for models: ``A C G T`` = 0..3, every other IUPAC code = ``N`` (4), and ``MASK``
(5) for masked-base prediction.
"""

from __future__ import annotations

import gzip
import re
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..checks import check_positive_int

__all__ = [
    "FastaRecord",
    "read_fasta",
    "write_fasta",
    "read_genbank",
    "encode",
    "decode",
    "join_records",
    "reverse_complement",
    "BASES",
    "N_TOKEN",
    "MASK_TOKEN",
    "VOCAB_SIZE",
    "DEFAULT_MAX_BASES",
]

BASES = "ACGT"
N_TOKEN = 4
MASK_TOKEN = 5
VOCAB_SIZE = 6

# IUPAC nucleotide codes (U is read as T). Anything else is an error.
IUPAC = "ACGTURYSWKMBDHVN"
_COMPLEMENT = str.maketrans(
    "ACGTURYSWKMBDHVNacgturyswkmbdhvn", "TGCAAYRSWMKVHDBNtgcaayrswmkvhdbn"
)

_TOKEN_OF = np.full(256, -1, dtype=np.int64)
for _c in IUPAC:
    for _ch in (_c, _c.lower()):
        _TOKEN_OF[ord(_ch)] = N_TOKEN
for _i, _c in enumerate(BASES):
    _TOKEN_OF[ord(_c)] = _TOKEN_OF[ord(_c.lower())] = _i
_TOKEN_OF[ord("U")] = _TOKEN_OF[ord("u")] = 3

_VALID = np.zeros(256, dtype=bool)
_VALID[_TOKEN_OF >= 0] = True


class FastaRecord:
    """One sequence. ``sequence`` is upper case and keeps every IUPAC code (N runs included).

    Args:
        name, description: the header's first word and the rest.
        sequence: the bases (upper case IUPAC).
        soft_mask: ``(L,)`` bool, True where the file had lower case (soft-masked repeats), or
            ``None`` for none. Kept packed (1 bit per base) and unpacked on access.
    """

    __slots__ = ("name", "description", "sequence", "_soft_bits")

    def __init__(self, name: str, description: str, sequence: str,
                 soft_mask: np.ndarray | None = None):
        self.name, self.description, self.sequence = name, description, sequence
        self._soft_bits: np.ndarray | None = None
        if soft_mask is not None:
            mask = np.asarray(soft_mask, dtype=bool)
            if mask.shape != (len(sequence),):
                raise ValueError(f"soft_mask must have shape ({len(sequence)},) like the "
                                 f"sequence, got {mask.shape}")
            if mask.any():
                self._soft_bits = np.packbits(mask)

    @property
    def soft_mask(self) -> np.ndarray:
        """``(L,)`` bool, True where the file had lower case (a fresh array on each access)."""
        if self._soft_bits is None:
            return np.zeros(len(self.sequence), dtype=bool)
        return np.unpackbits(self._soft_bits, count=len(self.sequence)).astype(bool)

    def __repr__(self) -> str:
        return (f"FastaRecord(name={self.name!r}, description={self.description!r}, "
                f"length={len(self.sequence)})")

    def __len__(self) -> int:
        return len(self.sequence)

    @property
    def n_mask(self) -> np.ndarray:
        """``(L,)`` bool, True where the base is unknown (``N`` or another ambiguity code)."""
        return encode(self.sequence).numpy() == N_TOKEN

    def n_runs(self) -> list[tuple[int, int]]:
        """``[(start, stop), ...]`` half-open runs of unknown bases."""
        m = np.concatenate([[False], self.n_mask, [False]]).astype(np.int8)
        edges = np.flatnonzero(np.diff(m))
        return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


#: Default limit of :func:`read_fasta` / :func:`read_genbank`: 2**27 (134 million) bases, about
#: a fruit-fly genome, ~1.5 GB once encoded as int64 tokens. Pass ``max_bases`` for more.
DEFAULT_MAX_BASES = 1 << 27
_READ_CHUNK = 1 << 20
# Headers, comments and line breaks on top of the bases (text allowed = factor * max_bases + slack).
_TEXT_SLACK = 1 << 20
_BINARY = bytes([*range(0x00, 0x09), *range(0x0E, 0x20), *range(0x7F, 0x100)])
_IUPAC_BYTES = (IUPAC + IUPAC.lower()).encode("ascii")


def _check_max_bases(max_bases) -> int:
    check_positive_int("max_bases", max_bases)
    return max_bases


def _bounded_chunks(path: Path, max_bases: int, text_factor: int) -> Iterator[bytes]:
    """The file's bytes in read chunks, gzip detected by its magic bytes and decompressed as
    it is read, then one empty chunk at the end. Raises ValueError only: a directory, an
    unreadable or corrupt file, and more than ``text_factor * max_bases`` (+1 MiB) bytes of text
    (a plain file before reading it, a gzip bomb as soon as it passes the limit)."""
    if path.is_dir():
        raise ValueError(f"{path}: is a directory, expected a sequence file")
    limit = text_factor * max_bases + _TEXT_SLACK
    too_big = (f"{path}: more than {limit} bytes of text, beyond max_bases={max_bases} bases "
               "(pass a larger max_bases to read a bigger genome)")
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below, after the stream is done
    except OSError as e:
        raise ValueError(f"{path}: cannot read file ({e})") from e
    with f:
        gz = f.read(2) == b"\x1f\x8b"
        f.seek(0)
        if not gz and path.stat().st_size > limit:
            raise ValueError(too_big)
        stream = gzip.GzipFile(fileobj=f, mode="rb") if gz else f
        total = 0
        while True:
            try:
                chunk = stream.read(_READ_CHUNK)
            except (OSError, EOFError, zlib.error) as e:
                raise ValueError(f"{path}: {'corrupt gzip data' if gz else 'cannot read file'} "
                                 f"({e})") from e
            total += len(chunk)
            if total > limit:
                raise ValueError(too_big)
            yield chunk
            if not chunk:
                return


def _text_lines(path: Path, max_bases: int, text_factor: int):
    """``(lineno, line)`` of the file as ASCII bytes, gzip detected by its magic bytes and
    decompressed as it is read: memory stays one chunk plus one line. Raises ValueError only;
    refuses, before reading on, a plain file larger than ``text_factor * max_bases`` (+1 MiB)
    and decompressed text beyond that, so a small gzip bomb cannot exhaust memory."""
    lineno, pending, pending_len = 0, [], 0
    for chunk in _bounded_chunks(path, max_bases, text_factor):
        if not chunk:  # end of file: the last line, unless the file ended with one
            tail = b"".join(pending)
            parts = [tail] if tail else []
        else:
            parts = chunk.split(b"\n")
            if len(parts) == 1:  # no line end in this chunk: the line goes on
                pending.append(chunk)
                pending_len += len(chunk)
                if pending_len > max_bases + _TEXT_SLACK:  # too many bases, or not FASTA
                    raise ValueError(f"{path}:{lineno + 1}: a line longer than max_bases="
                                     f"{max_bases} (+1 MiB) characters")
                continue
            parts[0] = b"".join(pending) + parts[0]
            pending = [parts.pop()]
            pending_len = len(pending[0])
        for line in parts:
            if line.endswith(b"\r"):
                line = line[:-1]
            for piece in line.split(b"\r") if b"\r" in line else (line,):  # old Mac ends
                lineno += 1
                if len(piece.translate(None, _BINARY)) != len(piece):
                    col = next(i for i, c in enumerate(piece) if c in _BINARY)
                    raise ValueError(f"{path}:{lineno}: binary or non-ASCII data "
                                     f"(byte 0x{piece[col]:02x}), not a text sequence file")
                yield lineno, piece
        if not chunk:
            return


def _check_sequence_line(path: Path, lineno: int, line: bytes) -> None:
    if line.translate(None, _IUPAC_BYTES):
        col = next(i for i, c in enumerate(line) if c not in _IUPAC_BYTES)
        raise ValueError(
            f"{path}:{lineno}:{col + 1}: character {chr(line[col])!r} is not an IUPAC nucleotide "
            f"code (allowed: {IUPAC}, upper or lower case)"
        )


def _record(name: str, desc: str, seq: bytearray, soft_case: bool,
            lower: bool | None = None) -> FastaRecord:
    """A record from its sequence bytes (upper-cased in place; the case kept as soft mask).
    ``lower``: whether ``seq`` has lower case, when the caller already knows."""
    soft = None
    if lower is None:
        lower = not seq.isupper()  # every byte is an IUPAC letter here
    if lower:
        arr = np.frombuffer(seq, dtype=np.uint8)
        lower = arr >= ord("a")
        arr[lower] -= 32  # writable view of the bytearray: upper case without a copy
        if soft_case:
            soft = lower
        del arr, lower
    text = seq.decode("ascii")
    seq.clear()  # the bytes go as soon as the string exists
    return FastaRecord(name, desc, text, soft)


_NL = b"\n"
_WHITESPACE = b" \t\n\r\x0b\x0c"  # what bytes.split() splits on, ignored inside sequence lines
# Bytes a clean upper-case sequence line may hold: deleting them leaves nothing.
_WS_UPPER = _WHITESPACE + IUPAC.encode("ascii")
_BINARY_RE = re.compile(b"[" + re.escape(_BINARY) + b"]")


def _text_blocks(path: Path, max_bases: int, text_factor: int):
    """``(lineno, block)``: the file as ASCII text in blocks of whole lines, line ends (``\n``,
    ``\r\n``, ``\r``) made ``\n``, ``lineno`` the number of the block's first line. Same checks
    and limits as :func:`_text_lines` (directories, size, gzip errors, binary bytes by line),
    but no per-line Python work: memory stays about two read chunks plus the longest line."""
    lineno, carry = 1, b""
    for chunk in _bounded_chunks(path, max_bases, text_factor):
        data = carry + chunk if carry else chunk
        if chunk and data.endswith(b"\r"):  # maybe half of a \r\n: decide with the next read
            data, carry = data[:-1], b"\r"
        else:
            carry = b""
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if not chunk:
            if data and not data.endswith(b"\n"):
                data += b"\n"
            last = len(data) - 1
        else:
            last = data.rfind(b"\n")
            if last < 0 or carry:
                carry = data[last + 1:] + carry
                if len(carry) > max_bases + _TEXT_SLACK:  # too many bases, or not FASTA
                    raise ValueError(f"{path}:{lineno + data.count(_NL, 0, last + 1)}: a "
                                     f"line longer than max_bases={max_bases} (+1 MiB) "
                                     "characters")
            else:
                carry = data[last + 1:]
        block = data[: last + 1] if last + 1 < len(data) else data
        if block:
            if len(block.translate(None, _BINARY)) != len(block):
                pos = _BINARY_RE.search(block).start()
                raise ValueError(f"{path}:{lineno + block.count(_NL, 0, pos)}: binary or "
                                 f"non-ASCII data (byte 0x{block[pos]:02x}), not a text "
                                 "sequence file")
            yield lineno, block
            lineno += block.count(b"\n")
        if not chunk:
            return


def _special_lines(block: bytes) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` of the lines of ``block`` (whole lines, ``\n`` ends) that start
    with ``>`` or ``;``, in order: found with ``bytes.find`` (no per-line work)."""
    starts = []
    for marker in (b">", b";"):  # rare bytes: find() skips to them at memchr speed
        i = block.find(marker)
        while i >= 0:
            if i == 0 or block[i - 1] == 10:  # at a line start
                starts.append(i)
            i = block.find(marker, i + 1)
    starts.sort()
    return [(s, block.index(_NL, s) + 1) for s in starts]


def _segment_error(path: Path, lineno: int, seg: bytes, what: str, max_bases: int = 0,
                   before: int = 0) -> ValueError:
    """The line-numbered error for a run of sequence lines ``seg`` starting at ``lineno``
    (error path only: here the lines are walked one by one)."""
    bases = before
    for i, line in enumerate(seg.split(b"\n")):
        part = b"".join(line.split())
        if not part:
            continue
        if what == "no header":
            return ValueError(f"{path}:{lineno + i}: sequence data before the first '>' "
                              "header (not FASTA?)")
        if what == "letter" and part.translate(None, _IUPAC_BYTES):
            col = next(j for j, c in enumerate(part) if c not in _IUPAC_BYTES)
            return ValueError(
                f"{path}:{lineno + i}:{col + 1}: character {chr(part[col])!r} is not an IUPAC "
                f"nucleotide code (allowed: {IUPAC}, upper or lower case)")
        bases += len(part)
        if what == "max_bases" and bases > max_bases:
            return ValueError(f"{path}:{lineno + i}: more than max_bases={max_bases} bases "
                              "(pass a larger max_bases to read a bigger genome)")
    raise AssertionError(f"no {what} error in the segment")  # unreachable: callers checked


def read_fasta(path: str | Path, *, min_length: int = 1,
               max_bases: int = DEFAULT_MAX_BASES) -> list[FastaRecord]:
    """Read every record of a FASTA file (plain or gzip).

    Args:
        path: the file.
        min_length: each record must have at least this many bases (e.g. the attention window),
            else ``ValueError`` naming the record's header line.
        max_bases: the most bases (all records together) read; more raise ``ValueError``
            naming ``max_bases``. Headers, comments and line breaks may add at most as much
            text again (plus 1 MiB): a plain file beyond that is refused before reading, a
            gzip file as soon as its decompressed text passes it. Default
            :data:`DEFAULT_MAX_BASES`.

    Returns:
        The records in file order. Lines starting with ``;`` are comments; whitespace inside
        sequence lines is ignored.

    Raises:
        ValueError: a directory, missing, empty or binary file, sequence before the first
            header, an empty record, a character outside IUPAC, a record shorter than
            ``min_length``, more than ``max_bases`` bases. The message names the file and line.

    Speed and memory: the file is read in 1 MiB blocks of whole lines; runs of sequence lines
    are cleaned and checked with ``bytes.translate`` (no Python work per sequence line). Peak
    memory is about the records themselves (1 byte per base, plus 1 bit per base for a soft
    mask when the file has lower case) plus the largest record once more while its string is
    made, plus two blocks.
    """
    path = Path(path)
    if isinstance(min_length, bool) or not isinstance(min_length, int) or min_length < 0:
        raise ValueError(f"min_length must be an int >= 0, got {min_length!r}")
    _check_max_bases(max_bases)
    records: list[FastaRecord] = []
    header: tuple[int, str] | None = None
    seq = bytearray()
    bases = 0
    content = False  # any non-blank line at all
    lower = False  # the current record has lower case

    def finish() -> None:
        if header is None:
            return
        lineno, text = header
        if not seq:
            raise ValueError(f"{path}:{lineno}: record {text!r} has no sequence")
        if len(seq) < min_length:
            raise ValueError(
                f"{path}:{lineno}: record {text!r} has {len(seq)} bases, shorter than the "
                f"required {min_length} (e.g. the attention window)"
            )
        name, _, desc = text.partition(" ")
        records.append(_record(name, desc.strip(), seq, soft_case=True, lower=lower))

    def sequence(block: bytes, a: int, b: int, lineno: int) -> None:
        """Add the sequence lines ``block[a:b]`` (first line number ``lineno``)."""
        nonlocal bases, content, lower
        seg = block[a:b]
        if seg.translate(None, _WS_UPPER):  # lower case, or not IUPAC at all
            lower = True
            if seg.translate(None, _WHITESPACE).translate(None, _IUPAC_BYTES):
                raise _segment_error(path, lineno, seg, "no header" if header is None
                                     else "letter")
        part = seg.translate(None, _WHITESPACE)
        if not part:
            return
        content = True
        if header is None:
            raise _segment_error(path, lineno, seg, "no header")
        if bases + len(part) > max_bases:
            raise _segment_error(path, lineno, seg, "max_bases", max_bases, bases)
        bases += len(part)
        seq.extend(part)

    for first, block in _text_blocks(path, max_bases, 2):
        at, lineno = 0, first  # `lineno` is the number of the line starting at `at`
        for s, e in _special_lines(block):
            if s > at:
                sequence(block, at, s, lineno)
                lineno += block.count(b"\n", at, s)
            content = True
            if block[s] == ord(">"):
                finish()
                text = block[s + 1 : e - 1].decode("ascii").strip()
                if not text:
                    raise ValueError(f"{path}:{lineno}: header line has no name")
                header, seq, lower = (lineno, text), bytearray(), False
            at, lineno = e, lineno + 1
        if at < len(block):
            sequence(block, at, len(block), lineno)
    if not content:
        raise ValueError(f"{path}: empty file, expected FASTA ('>name' then sequence lines)")
    finish()
    if not records:
        raise ValueError(f"{path}: no FASTA records (expected a '>name' header line)")
    return records


def write_fasta(records: Iterable[FastaRecord], path: str | Path, *, width: int = 60) -> None:
    """Write records (gzip when ``path`` ends in ``.gz``); soft-masked bases as lower case."""
    check_positive_int("width", width)
    out = []
    for r in records:
        seq = r.sequence
        if r.soft_mask is not None and r.soft_mask.any():
            arr = np.frombuffer(seq.encode("ascii"), dtype=np.uint8).copy()
            arr[r.soft_mask] = arr[r.soft_mask] + 32  # to lower case
            seq = arr.tobytes().decode("ascii")
        head = f">{r.name} {r.description}".rstrip()
        out.append(head)
        out.extend(seq[i : i + width] for i in range(0, len(seq), width))
    data = ("\n".join(out) + "\n").encode("ascii")
    path = Path(path)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def read_genbank(path: str | Path, *,
                 max_bases: int = DEFAULT_MAX_BASES) -> list[FastaRecord]:
    """The sequences (``ORIGIN`` sections) of a GenBank flat file, plain or gzip.

    Only LOCUS names, DEFINITION lines and the sequence are read; features are ignored.
    ``max_bases`` bounds the bases read (``ValueError`` beyond); the whole text may be at most
    eight times that (features, positions), as in :func:`read_fasta`.
    """
    path = Path(path)
    _check_max_bases(max_bases)
    records: list[FastaRecord] = []
    name, desc, seq, in_origin, start = None, "", bytearray(), False, 0
    bases, lineno, content = 0, 0, False
    for lineno, raw in _text_lines(path, max_bases, 8):
        line = raw.decode("ascii")
        content = content or bool(line.strip())
        if line.startswith("LOCUS"):
            parts = line.split()
            if len(parts) < 2:
                raise ValueError(f"{path}:{lineno}: LOCUS line has no name")
            name, desc, seq, in_origin, start = parts[1], "", bytearray(), False, lineno
        elif line.startswith("DEFINITION") and name is not None:
            desc = line[len("DEFINITION"):].strip()
        elif line.startswith("ORIGIN"):
            if name is None:
                raise ValueError(f"{path}:{lineno}: ORIGIN before any LOCUS line")
            in_origin = True
        elif line.startswith("//"):
            if name is None or not in_origin:
                raise ValueError(f"{path}:{lineno}: record end '//' without LOCUS and ORIGIN")
            if not seq:
                raise ValueError(f"{path}:{start}: GenBank record {name!r} has no sequence")
            records.append(_record(name, desc, seq, soft_case=False))
            name, in_origin = None, False
        elif in_origin:
            parts = raw.split()
            if not parts:
                continue
            if not parts[0].isdigit():
                raise ValueError(f"{path}:{lineno}: expected 'position bases...' in ORIGIN")
            part = b"".join(parts[1:])
            _check_sequence_line(path, lineno, part)
            bases += len(part)
            if bases > max_bases:
                raise ValueError(f"{path}:{lineno}: more than max_bases={max_bases} bases")
            seq += part
    if not content:
        raise ValueError(f"{path}: empty file, expected GenBank (LOCUS ... ORIGIN ... //)")
    if name is not None:
        raise ValueError(f"{path}:{lineno}: GenBank record {name!r} not closed by '//'")
    if not records:
        raise ValueError(f"{path}: no GenBank records with a sequence (LOCUS ... ORIGIN ... //)")
    return records


def encode(seq: str | bytes) -> Tensor:
    """Single-base tokens ``(L,)`` int64: A C G T(U) = 0..3, other IUPAC codes = ``N`` (4)."""
    if isinstance(seq, str):
        try:
            seq = seq.encode("ascii")
        except UnicodeEncodeError as e:
            raise ValueError(f"seq has a non-ASCII character at position {e.start}") from e
    if not isinstance(seq, (bytes, bytearray)):
        raise TypeError(f"seq must be str or bytes, got {type(seq).__name__}")
    arr = np.frombuffer(bytes(seq), dtype=np.uint8)
    tok = _TOKEN_OF[arr]
    bad = np.flatnonzero(tok < 0)
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"seq position {i}: {chr(arr[i])!r} is not an IUPAC nucleotide code")
    return torch.from_numpy(tok.copy())


def join_records(records: Iterable[FastaRecord], gap: int) -> Tensor:
    """Tokens ``(L,)`` of all records, separated by ``gap`` N tokens (masked in training and
    scoring) so a window of up to ``gap`` bases never sees two records at once."""
    if isinstance(gap, bool) or not isinstance(gap, int) or gap < 0:
        raise ValueError(f"gap must be an int >= 0, got {gap!r}")
    spacer = torch.full((gap,), N_TOKEN, dtype=torch.long)
    parts: list[Tensor] = []
    for i, r in enumerate(records):
        parts += ([spacer] if i else []) + [encode(r.sequence)]
    if not parts:
        raise ValueError("records must not be empty")
    return torch.cat(parts)


def decode(tokens: Tensor) -> str:
    """Inverse of :func:`encode` for tokens 0..4 (``MASK`` prints as ``?``)."""
    t = torch.as_tensor(tokens)
    if t.dim() != 1 or t.dtype.is_floating_point:
        raise ValueError(f"tokens must be a 1-D integer tensor, got {tuple(t.shape)} {t.dtype}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= VOCAB_SIZE):
        lo, hi = int(t.min()), int(t.max())
        raise ValueError(f"tokens must be in [0, {VOCAB_SIZE}), got [{lo}, {hi}]")
    return bytes(np.frombuffer(b"ACGTN?", dtype=np.uint8)[t.cpu().numpy()]).decode("ascii")


def reverse_complement(seq: str | Tensor) -> str | Tensor:
    """Reverse complement of a string (all IUPAC codes, case kept) or of a ``(..., L)`` token
    tensor (A<->T, C<->G; N and MASK stay)."""
    if isinstance(seq, str):
        encode(seq)  # validates: IUPAC only
        return seq.translate(_COMPLEMENT)[::-1]
    if isinstance(seq, Tensor):
        if seq.dtype.is_floating_point:
            raise TypeError(f"token tensor must be integer, got {seq.dtype}")
        comp = torch.tensor([3, 2, 1, 0, N_TOKEN, MASK_TOKEN], device=seq.device)
        return comp[seq.long()].flip(-1)
    raise TypeError(f"seq must be str or a token tensor, got {type(seq).__name__}")

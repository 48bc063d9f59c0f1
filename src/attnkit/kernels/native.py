"""Optional compiled CPU kernels: fused band (sliding-window) attention forward and backward,
split-K attention for decoding steps, dense attention over many short sequences (forward and
backward), and the matrix-vector products of a decoding step.

The engine's band kernel in plain PyTorch makes separate passes over each block's score matrix
(the score GEMM with a mask added, the softmax, the output GEMM). ``band_cpu.c`` fuses them per
block of query rows: one GEMM (the ``sgemm`` of torch's own BLAS), a softmax over each row's
contiguous key range in place, one GEMM. Its backward (:func:`band_backward`) recomputes the
probabilities from the saved log-sum-exp per block (five GEMMs) and sums a key/value head's
gradients over its query heads and blocks in a per-item buffer. Each source is compiled with the
system C compiler the first time it is needed (about a second), into a cache directory keyed by
the source, the headers it includes (``team.h``, ``vecmath.h``), the flags and the CPU, and
loaded with :mod:`ctypes` (which releases the GIL during the call). Every C entry point has one
signature, ``(ptr, geo, scale, nthreads, rt)`` (see ``team.h``).

Without a C compiler, without an ``sgemm`` in torch's library, on a failed self-check, or with
``ATTNKIT_NATIVE=0`` in the environment, :func:`band_available` is ``False`` and the engine uses
its PyTorch kernels (the same results). The engine sends fp32 CPU tensors only (the fp64
versions serve exactness checks such as ``gradcheck``). On CPUs with Intel AMX the fp32 band
forward runs its two products on the tile unit for ``D`` of 32 or 64 (each fp32 operand split
exactly into three bf16 parts, six part products summed in fp32: fp32 rounding, as the vector
path); ``ATTNKIT_AMX=0`` keeps it on the vector units (:func:`matrix_unit_available`).

``decode_cpu.c`` (:func:`decode_forward`, gated by :func:`decode_available`): every query row
of a cached decoding step against every key, the keys split in chunks so all threads work.

``short_cpu.c`` (:func:`short_forward` / :func:`short_backward`) is dense attention over many
short sequences (axial lines, patches), forward and backward, in fp32 and fp64, reading q/k/v
through arbitrary strides and batch offsets (see :mod:`.short`). Same fallbacks
(:func:`short_available`).

``gemv_cpu.c`` (:func:`gemv_rows`) multiplies a few rows by a weight matrix with every thread
streaming its own block of the weight's rows (a BLAS gemv reads it on one thread): decoding one
token is bound by reading the weights, so this is what sets its speed. Same fallbacks
(:func:`gemv_available`); no autograd (inference only).

Safety rules every entry point here keeps:

* **Layouts.** Each public function checks dtype, device and every size, and derives each
  stride it hands to C from the tensor itself (size-1 dims contribute nothing, stride-0
  expanded dims are read in place when the kernel takes a stride for them, else copied), so a
  kernel only ever reads elements of its inputs. Outputs are always fresh buffers.
* **Thread teams** (``team.h``): work items are handed out through an atomic counter, so the
  result does not depend on the team size OpenMP actually gives (``omp_set_dynamic(1)``,
  nested regions, ``OMP_NUM_THREADS=1``, ``torch.set_num_threads`` between calls); a kernel
  reports an error unless every item was done. :func:`set_team_limit` (or
  ``ATTNKIT_TEST_SHRINK_TEAM=N``) makes every parallel region start at most ``N`` threads while
  the work is still cut for the requested team: the test suite's shrunken team.
* **Self-checks**: each kernel is compared once per process with an fp64 reference on small odd
  problems, with a tolerance derived from the problem (see :func:`_tolerance`); a mismatch is
  retried once before the kernel is disabled, with a ``RuntimeWarning`` naming it and the
  mismatch. :func:`kernel_status` reports each kernel's state (for a report's provenance).
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import mmap
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["band_available", "band_backward", "band_forward", "band_weights", "BAND_MAX_WIDTH",
           "decode_available", "decode_forward", "empty_grads_like", "empty_in_layout",
           "gemv_available", "gemv_multi", "gemv_rows", "PreparedGemv", "kernel_status",
           "matrix_unit_available", "recycled_empty", "release_recycled",
           "set_team_limit", "step_available", "PreparedDecodeBlock", "PreparedDecodeModel",
           "BoundDecodeStep",
           "decode_block_reference", "back_with_huge_pages", "huge_page_empty",
           "short_available", "short_backward", "short_forward"]

_SOURCE = Path(__file__).with_name("band_cpu.c")
_DECODE_SOURCE = Path(__file__).with_name("decode_cpu.c")
_GEMV_SOURCE = Path(__file__).with_name("gemv_cpu.c")
_STEP_SOURCE = Path(__file__).with_name("step_cpu.c")
#: Headers the kernels include; their content is part of the build cache key.
_HEADERS = (Path(__file__).with_name("team.h"), Path(__file__).with_name("vecmath.h"))
#: Sources a kernel source compiles into its own unit (also part of its cache key).
_INCLUDED = {_STEP_SOURCE.name: (_GEMV_SOURCE, _DECODE_SOURCE)}
_FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-std=gnu99"]
_LIBS = ["-lm", "-lpthread"]
#: Widest band (``hi - lo + 1`` keys) the fused kernel takes; its per-thread score buffer is
#: ``block x (block + width)`` floats. Wider bands use the PyTorch kernel, which chunks.
BAND_MAX_WIDTH = 8192
#: Query rows per block of the fused kernel (one GEMM pair per block and head).
BLOCK = 64
#: Longest segment of query rows one backward work item takes (its per-thread buffers hold the
#: segment's keys' gradients).
BAND_SEGMENT_ROWS = 4096
#: Sizes the kernels pass to BLAS as 32-bit ints stay below this.
_INT32 = 2**31 - 1
#: dtypes of the key indices the weights kernels write (int32 where they fit, see
#: :func:`.structured.index_dtype`)
_INDEX_DTYPES = (torch.int32, torch.int64)
_EPS32 = torch.finfo(torch.float32).eps

_state: dict = {}         # the band kernel
_decode_state: dict = {}  # the split-K decoding kernel (same library as the band kernel)


def _cache_dir() -> Path:
    root = os.environ.get("ATTNKIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "attnkit")
    return Path(root)


def _cpu_key() -> str:
    """What ``-march=native`` depends on: the machine and its CPU flags."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return f"{platform.machine()}|{platform.processor()}|{flags}"


def _build(source: Path = _SOURCE) -> Path:
    """The compiled library of ``source`` (cached). A build that fails is tried once more
    without the AMX code (``-DATTNKIT_NO_AMX``: an assembler too old for the tile
    instructions); the vector paths are the same either way."""
    try:
        return _build_with(source, [])
    except RuntimeError as first:
        if b"ATTNKIT_NO_AMX" not in source.read_bytes():
            raise
        try:
            return _build_with(source, ["-DATTNKIT_NO_AMX"])
        except RuntimeError:
            raise first from None


def _build_with(source: Path, extra: list[str]) -> Path:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    deps = (*_HEADERS, *_INCLUDED.get(source.name, ()))
    src = source.read_bytes() + b"".join(h.read_bytes() for h in deps)
    flags = [*_FLAGS, *extra]
    key = hashlib.sha256(src + repr((flags, _LIBS, cc, _cpu_key())).encode()).hexdigest()[:16]
    out = _cache_dir() / f"{source.stem}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target, then rename: processes building at once (DDP ranks) never load
    # a half-written library
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *flags, "-o", tmp, str(source), *_LIBS],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed on {source.name}: {proc.stderr.strip()[:500]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


# ------------------------------------------------------------------------ thread teams

_libs: list = []  # every kernel library loaded, for set_team_limit
_team_limit = [0]


def _register(lib) -> None:
    """Remember a loaded kernel library and give it the current team limit."""
    setter = lib.attnkit_set_team_limit
    setter.argtypes, setter.restype = [ctypes.c_int], ctypes.c_int
    setter(_team_limit[0])
    _libs.append(lib)


def set_team_limit(n: int) -> int:
    """Test hook: make every parallel region of the compiled kernels start at most ``n``
    threads while the work is still cut for the team size requested (as a team that shrank
    under ``omp_set_dynamic(1)``); ``0`` lifts the limit. Applies to libraries loaded later too.
    The initial value comes from ``ATTNKIT_TEST_SHRINK_TEAM``. Returns the previous limit."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    old, _team_limit[0] = _team_limit[0], n
    for lib in _libs:
        lib.attnkit_set_team_limit(n)
    return old


def _env_team_limit() -> int:
    raw = os.environ.get("ATTNKIT_TEST_SHRINK_TEAM", "").strip()
    try:
        return max(0, int(raw)) if raw else 0
    except ValueError:
        warnings.warn(f"ATTNKIT_TEST_SHRINK_TEAM={raw!r} is not an integer; ignored",
                      RuntimeWarning, stacklevel=2)
        return 0


_team_limit[0] = _env_team_limit()


def _torch_symbol(name: str) -> int | None:
    lib_dir = Path(torch.__file__).with_name("lib")
    for cand in sorted(lib_dir.glob("libtorch_cpu*")):
        try:
            return ctypes.cast(getattr(ctypes.CDLL(str(cand)), name), ctypes.c_void_p).value
        except (OSError, AttributeError):
            continue
    return None


_runtime_cache: dict = {}


def _runtime(pool: bool = False):
    """The runtime hooks every kernel takes last (team.h's ``rt[]``): ``GOMP_parallel`` of
    torch's OpenMP runtime (``NULL`` with ``pool``: the kernels' own thread pool), torch's BLAS
    ``sgemm``, MKL's per-thread thread setter and ``dgemm`` (``NULL`` where absent), as a ctypes
    array made once."""
    if pool not in _runtime_cache:
        gemm = _torch_symbol("sgemm_")  # Fortran BLAS interface (32-bit ints), MKL or OpenBLAS
        one_thread = _torch_symbol("MKL_Set_Num_Threads_Local")  # MKL only; optional
        _runtime_cache[pool] = (ctypes.c_void_p * 4)(None if pool else _openmp(), gemm,
                                                     one_thread, _torch_symbol("dgemm_"))
    return _runtime_cache[pool]


def _entry(lib, name: str):
    """A kernel entry point with team.h's one signature ``(ptr, geo, scale, nthreads, rt)``."""
    fn = getattr(lib, name)
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_double, ctypes.c_int,
                   ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn


def _i64s(*values: int):
    """A ctypes int64 array (the ``ptr`` / ``geo`` arguments of a kernel)."""
    return (ctypes.c_int64 * len(values))(*values)


def _load_with_sgemm(source: Path, *names: str, pool: bool = False) -> dict:
    """A library whose kernels multiply through torch's ``sgemm`` (required), its entry points
    by name and the runtime hooks (see :func:`_runtime`)."""
    rt = _runtime(pool)
    if not rt[1]:
        raise RuntimeError("torch's library exports no sgemm_")
    lib = ctypes.CDLL(str(_build(source)))
    _register(lib)
    return {"rt": rt, **{name: _entry(lib, name) for name in names}}


def _load():
    rt = _runtime()
    if not rt[3]:
        raise RuntimeError("torch's library exports no dgemm_")
    return _load_with_sgemm(_SOURCE, "band_union_layout", "band_matrix_unit",
                            *(f"band_{kind}_{suffix}" for kind in ("forward", "backward", "weights")
                              for suffix in ("f32", "f64")))


def _load_decode():
    # the decoding-step kernels (this one, GEMV) run on team.h's own pool: a step makes ~30
    # short calls, and on a busy machine OpenMP's fork-join barrier waits for a descheduled
    # worker's time slice at each (measured on the loaded 2-core machine: steps 5-10x faster)
    return _load_with_sgemm(_DECODE_SOURCE, "decode_forward", pool=True)


def _openmp_library() -> str | None:
    """Path of the OpenMP runtime (with ``GOMP_parallel``) torch loaded, found in this process's
    memory map; torch's own bundled runtime first, should another be loaded too."""
    torch.ones(64, 64).sum()  # make sure torch's OpenMP runtime is loaded and initialized
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    paths = {line.split()[-1] for line in maps if "omp" in line.rsplit("/", 1)[-1]
             and line.split()[-1].startswith("/")}
    torch_dir = str(Path(torch.__file__).parent)
    for path in sorted(paths, key=lambda p: (not p.startswith(torch_dir), p)):
        try:
            ctypes.CDLL(path).GOMP_parallel  # noqa: B018 - does it have the symbol?
        except (OSError, AttributeError):
            continue
        return path
    return None


def _openmp() -> int | None:
    """``GOMP_parallel`` of the OpenMP runtime torch loaded, so the kernels run on torch's own
    thread team: separate threads would compete for the cores with torch's idle workers, which
    spin for a while after each parallel op. ``None``: the kernels start POSIX threads."""
    path = _openmp_library()
    if path is None:
        return None
    return ctypes.cast(ctypes.CDLL(path).GOMP_parallel, ctypes.c_void_p).value


# ------------------------------------------------------------------------ self-checks


class _Mismatch(RuntimeError):
    """A self-check found a kernel's result outside the tolerance of its fp64 reference."""


def _tolerance(eps: float, d: int, score_max: float, keys: int, magnitude: float) -> float:
    """Error allowed for an attention result of magnitude ``magnitude`` computed in a precision
    with unit roundoff ``eps``: each score carries about ``sqrt(d) * eps * score_max`` of
    rounding (a ``d``-term dot product), which moves the softmax weights by that much relative
    (twice: numerator and normalizer); the weighted sum over ``keys`` keys adds about
    ``sqrt(keys) * eps``; the exponential's polynomial a few eps. A factor of 16 over these
    estimates keeps a correct kernel far inside it, while a wrong layout, a missing row or a
    wrong scale is off by O(1) of the magnitude, far outside."""
    return 16 * eps * (2 * math.sqrt(max(d, 1)) * (1 + score_max) + math.sqrt(max(keys, 1))
                       + 4) * max(magnitude, 1e-30)


def _compare(what: str, got: Tensor, ref: Tensor, tol: float) -> None:
    """Raise :class:`_Mismatch` unless ``got`` is within ``tol`` of the fp64 ``ref`` everywhere
    (equal infinities count as equal, a NaN never does)."""
    got, ref = got.double(), ref.double()
    same_inf = torch.isinf(ref) & (got == ref)
    diff = torch.where(same_inf, torch.zeros_like(ref), (got - ref).abs())
    err = float(diff.max()) if diff.numel() else 0.0
    if torch.isnan(diff).any():
        err = math.nan
    if not err <= tol:
        raise _Mismatch(f"{what}: max error {err:.3g} against the fp64 reference exceeds the "
                        f"tolerance {tol:.3g}")


def _reference(q: Tensor, k: Tensor, v: Tensor, scale: float,
               mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """fp64 masked softmax attention of ``q (B, Hq, Lq, d)`` over ``k (B, Hkv, Lk, d)``, ``v``:
    ``(out, lse, scores)`` (rows without keys: zeros and ``-inf``)."""
    q, k, v = q.double(), k.double(), v.double()
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = scale * (q @ k.transpose(-1, -2))
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(s, -1)
    w = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)
    return w @ v, lse, s


def _check_attention(what: str, out: Tensor, lse: Tensor, q, k, v, scale, mask=None) -> None:
    ref, ref_lse, s = _reference(q, k, v, scale, mask)
    finite = s[torch.isfinite(s)]
    smax = float(finite.abs().max()) if finite.numel() else 0.0
    tol = _tolerance(_EPS32, q.shape[-1], smax, k.shape[-2], 1.0)
    _compare(f"{what} output", out, ref, tol * float(v.abs().max()))
    _compare(f"{what} log-sum-exp", lse, ref_lse, tol * (1 + smax))


def _self_check() -> None:
    """Small odd bands (batch 2, GQA 2:1, a partial row range, strided slices) against a dense
    fp64 reference, forward and backward, in both precisions, so a BLAS with other integer
    widths or a miscompiled kernel disables the path instead of giving wrong answers."""
    for dtype in _BAND_DTYPES:
        g = torch.Generator().manual_seed(0)
        q = torch.randn(2, 4, 37, 8, generator=g, dtype=dtype)
        k = torch.randn(2, 2, 40, 8, generator=g, dtype=dtype)
        v = torch.randn(2, 2, 40, 5, generator=g, dtype=dtype)
        i, j = torch.arange(37).view(-1, 1), torch.arange(37).view(1, -1)
        mask = (j - i >= -4) & (j - i <= 2)
        for q0, q1, scale in ((0, 37, 1.0), (5, 30, 0.37)):
            out, lse = _call(q, k[:, :, 3:], v[:, :, 3:], -4, 2, q0, q1, block=16, scale=scale)
            _check_attention(f"band rows [{q0}, {q1}) ({dtype})", out, lse, q[:, :, q0:q1],
                             k[:, :, 3:], v[:, :, 3:], scale, mask[q0:q1])
        _band_backward_self_check(q, k, v, g)
        _band_weights_self_check(q, k, v)
    # the fp32 forward's matrix-unit path where the CPU has one (D = 64, Dv a multiple of 16;
    # more keys than queries, a row range, GQA 2:1); elsewhere the vector path again
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 45, 64, generator=g)
    k, v = torch.randn(1, 1, 50, 64, generator=g), torch.randn(1, 1, 50, 32, generator=g)
    i, j = torch.arange(45).view(-1, 1), torch.arange(50).view(1, -1)
    mask = (j - i - 5 >= -20) & (j - i - 5 <= 3)
    out, lse = _call(q, k, v, -20, 3, 3, 41, block=16, scale=0.2)
    _check_attention("band rows [3, 41), D = 64", out, lse, q[:, :, 3:41], k, v, 0.2, mask[3:41])


def _band_backward_self_check(q: Tensor, k: Tensor, v: Tensor, g: torch.Generator) -> None:
    """Backward over all 40 keys (Lk > Lq): one segment of rows per kv head, and three (their
    halos merged), against fp64 autograd with gradients on both the output and the lse."""
    i, j = torch.arange(37).view(-1, 1), torch.arange(40).view(1, -1)
    lo, hi = -4, 2
    mask = (j - i - 3 >= lo) & (j - i - 3 <= hi)
    dout = torch.randn(2, 4, 37, 5, generator=g, dtype=q.dtype)
    dlse = torch.randn(2, 4, 37, generator=g, dtype=q.dtype)
    _, lse = _call(q, k, v, lo, hi, 0, 37, block=8)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    with torch.enable_grad():  # the first call may come from inside an autograd Function
        s = leaves[0] @ leaves[1].repeat_interleave(2, 1).transpose(-1, -2)
        s = s.masked_fill(~mask, -math.inf)
        ref_lse = torch.logsumexp(s, -1)
        ref = torch.exp(s - ref_lse.unsqueeze(-1)) @ leaves[2].repeat_interleave(2, 1)
        want = torch.autograd.grad((ref, ref_lse), leaves, (dout.double(), dlse.double()))
    smax = float(s.detach()[mask.expand_as(s)].abs().max())
    tol = 4 * _tolerance(torch.finfo(q.dtype).eps, q.shape[-1], smax, 1 + hi - lo, 1.0)
    for nseg in (1, 3):
        got = _band_backward_call(q, k, v, dout, lse, dlse, lo, hi, block=8, nseg=nseg)
        for name, a, b in zip(("dq", "dk", "dv"), got, want):
            _compare(f"band backward {name} ({nseg} segments, {q.dtype})", a, b,
                     tol * float(b.abs().max()))


def _band_weights_self_check(q: Tensor, k: Tensor, v: Tensor) -> None:
    """Band weights written into a CSR buffer with a gap after every row's run (which must stay
    untouched), against fp64 ``exp(s - lse)``; bands of 7 and 13 keys (the vector loop and its
    tail), Lk > Lq, GQA 2:1."""
    q, k, v = q.detach(), k.detach(), v.detach()  # the backward check may have marked them
    lq, lk = q.shape[2], k.shape[2]
    rows = torch.arange(lq).view(-1, 1)
    cols = torch.arange(lk).view(1, -1)
    for lo, hi in ((-4, 2), (-9, 3)):
        mask = (cols - rows - (lk - lq) >= lo) & (cols - rows - (lk - lq) <= hi)
        _, lse = _call(q, k, v, lo, hi, 0, lq, block=8)
        n = mask.sum(1)
        offs = torch.zeros(lq, dtype=torch.long)
        offs[1:] = torch.cumsum(n + 1, 0)[:-1]
        ncols = int(offs[-1] + n[-1] + 1)
        bh = q.shape[0] * q.shape[1]
        vals = torch.full((bh, ncols), 7.0, dtype=q.dtype)
        idx = torch.full((ncols,), -1, dtype=torch.long)
        _band_weights_call(q, k, lse.reshape(bh, lq), lo, hi, vals, offs, idx, block=8)
        # the forward writing its probabilities, rows [5, 30) of the same runs
        fvals, fidx = torch.full_like(vals, 7.0), torch.full_like(idx, -1)
        _call(q, k, v, lo, hi, 5, 30, block=8, weights=(fvals, offs[5:30], fidx, 0))
        _, ref_lse, s = _reference(q, k, v, 1.0, mask)
        want = torch.exp(s - ref_lse.unsqueeze(-1)).reshape(bh, lq, lk)
        pos = offs.view(-1, 1) + torch.arange(lk).view(1, -1) - (rows + (lk - lq) + lo).clamp(0)
        at = pos[mask]
        if not torch.equal(idx[at], cols.expand(lq, lk)[mask]):
            raise _Mismatch(f"band weights ({q.dtype}): wrong key indices")
        gap = torch.ones(ncols, dtype=torch.bool)
        gap[at] = False
        if not (bool((vals[:, gap] == 7.0).all()) and bool((idx[gap] == -1).all())):
            raise _Mismatch(f"band weights ({q.dtype}): wrote outside the rows' runs")
        smax = float(s[mask.expand_as(s)].abs().max())
        tol = 4 * _tolerance(torch.finfo(q.dtype).eps, q.shape[-1], smax, 1 + hi - lo, 1.0)
        _compare(f"band weights lo={lo} hi={hi} ({q.dtype})", vals[:, at],
                 want[:, mask], tol)
        part = torch.zeros(lq, 1, dtype=torch.bool)
        part[5:30] = True
        at_f = pos[mask & part]
        done = torch.zeros(ncols, dtype=torch.bool)
        done[at_f] = True
        if not (torch.equal(fidx[at_f], cols.expand(lq, lk)[mask & part])
                and bool((fvals[:, ~done] == 7.0).all()) and bool((fidx[~done] == -1).all())):
            raise _Mismatch(f"band forward's weights ({q.dtype}): wrong keys or places")
        _compare(f"band forward's weights lo={lo} hi={hi} ({q.dtype})", fvals[:, at_f],
                 want[:, mask & part], tol)
        # in a union: normalized over the band and the other components' mass (here e^0.7
        # times the band's), from the other components' log-sum-exp per row
        other = (ref_lse.reshape(bh, lq)[:, 5:30] + 0.7).to(q.dtype).contiguous()
        uvals = torch.full_like(vals, 7.0)
        _call(q, k, v, lo, hi, 5, 30, block=8, weights=(uvals, offs[5:30], None, 0, other))
        union = torch.logaddexp(ref_lse.reshape(bh, lq)[:, 5:30], other.double())
        want_u = torch.exp(s.reshape(bh, lq, lk)[:, 5:30] - union.unsqueeze(-1))
        _compare(f"band forward's union weights lo={lo} hi={hi} ({q.dtype})", uvals[:, at_f],
                 want_u[:, mask[5:30]], tol)


def _decode_self_check() -> None:
    """The decoding kernel: 3 rows per head, 2 key/value heads, keys split in 3 chunks, through
    BLAS (odd sizes) and through its register-blocked products (d % 8 == 0, dv % 32 == 0)."""
    g = torch.Generator().manual_seed(1)
    for d, dv in ((8, 5), (16, 32)):
        q, k = torch.randn(2, 3, d, generator=g), torch.randn(2, 41, d, generator=g)
        v = torch.randn(2, 41, dv, generator=g)
        out, lse = _decode_call(q, k, v, nsplit=3, scale=0.5, ks=k.stride(0), vs=v.stride(0))
        _check_attention(f"decoding d={d} dv={dv}", out, lse, q[None], k[None], v[None], 0.5)


def _env_off(name: str) -> bool:
    """Whether the environment switch ``name`` (on by default) is set to 0 / false / no / off."""
    return os.environ.get(name, "1").strip().lower() in ("0", "false", "no", "off")


def _native_disabled() -> bool:
    return _env_off("ATTNKIT_NATIVE")


def _keep(t: Tensor) -> Tensor:
    return t


def _isolated(self_check) -> None:
    """Run a self-check unseen by the caller's autograd context: the first kernel call may come
    from inside activation checkpointing, whose saved-tensor hooks would otherwise count the
    check's own autograd reference (and then find fewer tensors on recomputation)."""
    with torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
        self_check()


def _available(state: dict, load, self_check, what: str) -> bool:
    """Build, load and check a kernel once; any failure means: use the PyTorch path. A failed
    self-check is retried once (a transient failure must not change results and speed for the
    whole process); the reason for disabling is kept for :func:`kernel_status`."""
    if "ok" not in state:
        state["ok"] = False
        state["reason"] = None
        if _native_disabled():
            state["reason"] = "disabled by ATTNKIT_NATIVE"
            return False
        try:
            state["fn"] = load()
            try:
                _isolated(self_check)
            except Exception as first:  # noqa: BLE001 - retried once, then reported
                try:
                    _isolated(self_check)
                except Exception as second:  # noqa: BLE001
                    raise RuntimeError(f"self-check failed twice: {first}; then: {second}") \
                        from second
            state["ok"] = True
        except Exception as e:  # noqa: BLE001 - any failure means: use the PyTorch kernels
            state.pop("fn", None)
            state["reason"] = f"{type(e).__name__}: {e}"
            warnings.warn(f"attnkit: {what} unavailable ({e}); using PyTorch instead",
                          RuntimeWarning, stacklevel=3)
    return state["ok"]


def band_available() -> bool:
    """Whether the fused band kernel is built, loaded and checked (built on the first call)."""
    return _available(_state, _load, _self_check, "fused CPU band kernel")


def decode_available() -> bool:
    """Whether the split-K decoding kernel is built, loaded and checked."""
    return _available(_decode_state, _load_decode, _decode_self_check,
                      "native decoding attention kernel")


def matrix_unit_available() -> bool:
    """Whether the fp32 band forward runs its two products on the CPU's tile matrix unit (Intel
    AMX) for head sizes ``D`` of 32 or 64 and ``Dv`` a multiple of 16: the band kernel is
    available, was built for a CPU with AMX, the OS granted the process its tile state, and
    ``ATTNKIT_AMX`` is not 0. Each fp32 operand is split exactly into three bf16 parts and six
    part products are summed in fp32 (see ``band_cpu.c``), so results carry fp32 rounding as the
    vector path's do."""
    if _env_off("ATTNKIT_AMX") or not band_available():
        return False
    return bool(_state["fn"]["band_matrix_unit"](None, None, 0.0, 1, None))


def kernel_status() -> dict[str, dict]:
    """Each compiled kernel's state, for a report's provenance: ``{"band" | "decode" | "short"
    | "gemv" | "step": {"available": bool, "reason": str | None}}``, ``reason`` saying why an
    unavailable kernel is off (no compiler, ``ATTNKIT_NATIVE=0``, a failed self-check with its
    mismatch); the band's entry also says whether its fp32 forward uses the tile matrix unit
    (``"matrix_unit"``, see :func:`matrix_unit_available`). Builds and checks the kernels not
    tried yet (so it reports what a call would get)."""
    checks = {"band": (band_available, _state), "decode": (decode_available, _decode_state),
              "short": (short_available, _short_state), "gemv": (gemv_available, _gemv_state),
              "step": (step_available, _step_state)}
    status = {}
    for name, (available, state) in checks.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the reason is reported here instead
            ok = bool(available())
        status[name] = {"available": ok, "reason": None if ok else state.get("reason")}
    status["band"]["matrix_unit"] = matrix_unit_available()
    return status


# ------------------------------------------------------------------------ validation


def _need(t, name: str, dims: int, dtypes=(torch.float32,)) -> None:
    """``t`` is a CPU tensor of ``dims`` dims and one of ``dtypes``, else TypeError/ValueError."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dims, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must be {' or '.join(map(str, dtypes))}, got {t.dtype}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be on the CPU, got {t.device}")
    if t.is_sparse or t.layout != torch.strided:
        raise ValueError(f"{name} must be a dense (strided) tensor")


def _int(x, name: str) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    return x


def _stride(t: Tensor, dim: int) -> int:
    """``t``'s stride along ``dim`` for a kernel that multiplies it by indices in
    ``range(t.shape[dim])``: 0 for a size-1 dim (its stride is meaningless and may be anything),
    so the kernel never steps by it."""
    return 0 if t.shape[dim] <= 1 else t.stride(dim)


def _rows_ok(t: Tensor) -> bool:
    """Whether ``t (..., L, D)`` has contiguous channels and rows that follow each other: the
    kernel addresses row ``i``, channel ``c`` as ``i * D + c``."""
    return ((t.shape[-1] <= 1 or t.stride(-1) == 1)
            and (t.shape[-2] <= 1 or t.stride(-2) == t.shape[-1]))


def _rows_contiguous(t: Tensor) -> Tensor:
    """``t (B, H, L, D)`` itself if each row of ``D`` is contiguous and rows follow each other
    within a head (batch and head strides are free), else a contiguous copy."""
    if _rows_ok(t):
        return t
    t = t.contiguous()
    if not _rows_ok(t):  # contiguous() keeps odd strides only on size-1 dims
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def _merged_stride(t: Tensor) -> int | None:
    """A stride ``s`` with ``offset(b, h) = (b * H + h) * s`` for every index of ``t``'s first
    two dims ``(B, H)`` (the decoding kernel takes one stride between its ``B * H`` heads), or
    None. Size-1 dims impose nothing (their strides may be anything); a stride-0 dim is fine
    when it is the only one (all heads read the same keys in place)."""
    b, h = t.shape[0], t.shape[1]
    if b * h <= 1:
        return 0
    if b == 1:
        return t.stride(1)
    if h == 1:
        return t.stride(0)
    return t.stride(1) if t.stride(0) == h * t.stride(1) else None


def _band_status(rc: int, what: str, scale: float) -> None:
    """Raise for a band forward's or weights call's nonzero return code (band_cpu.c: -2 a run
    outside the weights buffer, -3 indices too narrow for the keys, -4 a scale that is not
    finite, else out of memory); ``what`` names the call in the message."""
    name = f"attnkit fused band kernel{what}"
    if rc == -2:
        raise RuntimeError(f"{name}: a row's run of weights fell outside the values buffer")
    if rc == -3:
        raise ValueError(f"{name}: the weights' indices are too narrow for the keys")
    if rc == -4:
        raise ValueError(f"{name}: scale must be finite, got {scale}")
    if rc != 0:
        raise MemoryError(f"{name}: out of memory for its buffers")


def _check_index_width(indices: Tensor, lk: int) -> None:
    """A weights index buffer of int32 must hold every key below ``lk``, else ValueError."""
    if indices.dtype == torch.int32 and lk > _INT32 + 1:
        raise ValueError(f"int32 indices cannot hold the keys of Lk = {lk}; use int64")


def _check_scale(scale) -> None:
    """A band kernel's factor on the queries: a finite real number, else ValueError."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) \
            or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float, got {scale!r}")


def _check_sizes(**sizes: int) -> None:
    for name, n in sizes.items():
        if not 0 < n <= _INT32:
            raise ValueError(f"{name} must be in [1, {_INT32}] for the compiled kernel, got {n}")


# ------------------------------------------------------------------------ band


def _call(q: Tensor, k: Tensor, v: Tensor, lo: int, hi: int, q0: int, q1: int,
          block: int | None = None, weights: tuple | None = None,
          scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """q ``(B, Hq, Lq, d)``, k ``(B, Hkv, Lk, d)``, v ``(B, Hkv, Lk, dv)``, rows contiguous
    (see :func:`_rows_ok`; batch and head strides are free), already checked; ``weights``:
    ``(values, offsets, indices or None, key0[, other_lse or None])`` checked by
    :func:`band_forward`; ``scale``: the factor on ``q`` (finite)."""
    fns = _state["fn"]
    block = BLOCK if block is None else block  # read at call time: tests shrink it
    B, hq = q.shape[:2]
    dv = v.shape[3]
    assert all(_rows_ok(t) for t in (q, k, v))
    out = q.new_empty(B, hq, q1 - q0, dv)
    lse = q.new_empty(B, hq, q1 - q0)
    if out.numel() == 0:
        return out, lse
    vals, offs, idx, key0, *other = (None, None, None, 0) if weights is None else weights
    wlse = other[0] if other else None
    geo = _band_geometry(q, k, v, lo, hi, q0, q1, block, weights=vals, key0=key0, indices=idx)
    ptr = _i64s(*(0 if t is None else t.data_ptr()
                  for t in (q, k, v, out, lse, vals, offs, idx, wlse)))
    rc = fns[f"band_forward_{_BAND_DTYPES[q.dtype]}"](ptr, geo, scale, torch.get_num_threads(),
                                                      fns["rt"])
    _band_status(rc, "", scale)
    return out, lse


#: dtypes of the band kernels (fp64: for exactness checks such as gradcheck; the engine sends
#: fp32 only) and their entry points' suffixes.
_BAND_DTYPES = {torch.float32: "f32", torch.float64: "f64"}


def _band_inputs(qs: Tensor, k: Tensor, v: Tensor) -> None:
    """``qs (B, Hkv, G, Lq, D)``, ``k (B, Hkv, Lk, D)``, ``v (B, Hkv, Lk, Dv)``, one dtype of
    :data:`_BAND_DTYPES`, on the CPU; else TypeError / ValueError."""
    _need(qs, "qs", 5, tuple(_BAND_DTYPES))
    _need(k, "k", 4, (qs.dtype,))
    _need(v, "v", 4, (qs.dtype,))
    B, hkv, g, lq, d = qs.shape
    if k.shape[:2] != (B, hkv) or v.shape[:3] != k.shape[:3] or k.shape[3] != d:
        raise ValueError(f"k must be (B, Hkv, Lk, D) = ({B}, {hkv}, Lk, {d}) and v (B, Hkv, Lk, "
                         f"Dv) with the same Lk; got k {tuple(k.shape)}, v {tuple(v.shape)}")


def _band_geometry(q: Tensor, k: Tensor, v: Tensor, lo: int, hi: int, q0: int, q1: int,
                   block: int, dout: Tensor | None = None, nseg: int = 1,
                   weights: Tensor | None = None, key0: int = 0,
                   indices: Tensor | None = None):
    """band_cpu.c's ``geo`` (its ``B_*`` slots) for ``q (B, Hq, Lq, d)``, ``k``, ``v`` (and
    ``dout (B, Hq, Lq, dv)`` for backward, the ``(B * Hq, ncols)`` values buffer for
    weights, the key index of ``k``'s first row and the index buffer the keys go to, for the
    bytes of each), rows contiguous."""
    B, hq, lq, d = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    do_strides = (0, 0) if dout is None else (_stride(dout, 0), _stride(dout, 1))
    index_bytes = 8 if indices is None else indices.element_size()
    w_slots = (0, 0, 0, 8) if weights is None else (weights.shape[1], _stride(weights, 0), key0,
                                                      index_bytes)
    return _i64s(B, hq, hkv, lq, lk, d, dv, lo, hi, q0, q1, block, _stride(q, 0), _stride(q, 1),
                 _stride(k, 0), _stride(k, 1), _stride(v, 0), _stride(v, 1), *do_strides, nseg,
                 *w_slots, 0 if _env_off("ATTNKIT_AMX") else 1)


def _band_segments(heads: int, lq: int, threads: int) -> int:
    """Segments of query rows per kv head in the band backward (one work item each): enough
    items for every thread (a few per thread, so a smaller team still balances), none longer
    than :data:`BAND_SEGMENT_ROWS` (its per-thread buffers). ``heads``: batch x kv heads."""
    per_thread = -(-4 * threads // heads) if heads < 2 * threads else 1
    return max(per_thread, -(-lq // BAND_SEGMENT_ROWS))


def _band_backward_call(q: Tensor, k: Tensor, v: Tensor, dout: Tensor, lse: Tensor,
                        dlse: Tensor | None, lo: int, hi: int, block: int | None = None,
                        nseg: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """q ``(B, Hq, Lq, d)``, k, v ``(B, Hkv, Lk, .)``, dout ``(B, Hq, Lq, dv)`` with rows
    contiguous; lse, dlse ``(B, Hq, Lq)`` contiguous; already checked. Returns contiguous
    ``dq, dk, dv``. ``nseg``: segments of rows per kv head (default: sized to the team)."""
    fns = _state["fn"]
    block = BLOCK if block is None else block
    B, hq, lq, d = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    assert all(_rows_ok(t) for t in (q, k, v, dout)) and lse.is_contiguous()
    assert dlse is None or dlse.is_contiguous()
    dq, dk, dvv = q.new_empty(B, hq, lq, d), k.new_empty(B, hkv, lk, d), v.new_empty(B, hkv, lk, dv)
    threads = torch.get_num_threads()
    nseg = max(1, min(_band_segments(B * hkv, lq, threads) if nseg is None else nseg,
                      -(-lq // block)))
    geo = _band_geometry(q, k, v, lo, hi, 0, lq, block, dout, nseg)
    ptr = _i64s(q.data_ptr(), k.data_ptr(), v.data_ptr(), dout.data_ptr(), lse.data_ptr(),
                0 if dlse is None else dlse.data_ptr(), dq.data_ptr(), dk.data_ptr(),
                dvv.data_ptr())
    rc = fns[f"band_backward_{_BAND_DTYPES[q.dtype]}"](ptr, geo, 1.0, threads, fns["rt"])
    if rc != 0:
        raise MemoryError("attnkit fused band kernel (backward): out of memory for its buffers")
    return dq, dk, dvv


def _band_weights_call(q: Tensor, k: Tensor, lse: Tensor, lo: int, hi: int, values: Tensor,
                       offsets: Tensor, indices: Tensor | None, block: int | None = None,
                       scale: float = 1.0) -> None:
    """q ``(B, Hq, Lq, d)``, k ``(B, Hkv, Lk, d)`` rows contiguous, lse ``(B * Hq, Lq)``
    contiguous, values ``(B * Hq, ncols)`` with contiguous rows, offsets ``(Lq,)`` and indices
    ``(ncols,)`` contiguous int64 (indices: int32 or int64); already checked (the kernel
    checks each run again)."""
    fns = _state["fn"]
    block = BLOCK if block is None else block
    assert _rows_ok(q) and _rows_ok(k) and lse.is_contiguous() and offsets.is_contiguous()
    assert values.shape[1] <= 1 or values.stride(1) == 1
    geo = _band_geometry(q, k, k, lo, hi, 0, q.shape[2], block, weights=values,
                         indices=indices)
    ptr = _i64s(q.data_ptr(), k.data_ptr(), lse.data_ptr(), values.data_ptr(),
                offsets.data_ptr(), 0 if indices is None else indices.data_ptr())
    rc = fns[f"band_weights_{_BAND_DTYPES[q.dtype]}"](ptr, geo, scale, torch.get_num_threads(),
                                                      fns["rt"])
    _band_status(rc, " (weights)", scale)


def _check_runs(values: Tensor, offsets: Tensor, indices: Tensor | None, dtype, bh: int,
                lq: int, lk: int, lo: int, hi: int, q0: int, q1: int) -> None:
    """A CSR weights buffer for the band ``[lo, hi]`` rows ``[q0, q1)``: ``values (bh, ncols)``
    of ``dtype`` with contiguous rows, ``offsets (q1 - q0,)`` int64 contiguous with every row's
    run of keys inside ``[0, ncols)``, ``indices (ncols,)`` int32 or int64 contiguous or None;
    else TypeError / ValueError (the kernels check each run, and the keys' index width, again).
    """
    _need(values, "values", 2, (dtype,))
    ncols = values.shape[1]
    if values.shape[0] != bh:
        raise ValueError(f"values must have B * Hq = {bh} rows, got {values.shape[0]}")
    if ncols > 1 and values.stride(1) != 1:
        raise ValueError("values must have contiguous rows (stride 1 along dim 1)")
    _need(offsets, "offsets", 1, (torch.int64,))
    if offsets.numel() != q1 - q0 or not offsets.is_contiguous():
        raise ValueError(f"offsets must be a contiguous ({q1 - q0},) tensor, got "
                         f"{tuple(offsets.shape)}")
    if indices is not None:
        _need(indices, "indices", 1, _INDEX_DTYPES)
        _check_index_width(indices, lk)
        if indices.numel() != ncols or not indices.is_contiguous():
            raise ValueError(f"indices must be a contiguous ({ncols},) tensor, got "
                             f"{tuple(indices.shape)}")
    pos = torch.arange(q0, q1) + (lk - lq)
    n = ((pos + hi + 1).clamp(0, lk) - (pos + lo).clamp(0, lk)).clamp_min(0)
    if bool(((n > 0) & ((offsets < 0) | (offsets > ncols - n))).any()):
        raise ValueError(f"offsets: some row's run of keys falls outside values' {ncols} "
                         "columns")


#: Sorted key lists one :func:`union_layout` call merges (band_cpu.c's UNION_MAX_LISTS).
UNION_MAX_LISTS = 16


#: Row blocks at most in one :func:`union_layout` call (team.h's TEAM_MAX), and rows per block
#: at least by default (fewer rows than this cost less than starting the team).
UNION_MAX_BLOCKS, UNION_BLOCK_ROWS = 64, 1024


def union_layout(indptr: Tensor, offsets: Tensor, indices: Tensor, keys: list[Tensor],
                 q0: int, lq: int, lk: int, lo: int, hi: int, nnz: int,
                 blocks: int | None = None) -> tuple[list[Tensor], int]:
    """The CSR layout of query rows ``[q0, q0 + nq)`` of a union of the band ``[lo, hi]`` with
    other components (``band_cpu.c``'s ``band_union_layout``, one pass over the pairs): row
    ``i`` holds the other components' keys below its band, the band's run, then their keys
    above it. The rows are cut into ``blocks`` contiguous blocks laid out by the thread team
    (default: one per thread, of at least :data:`UNION_BLOCK_ROWS` rows), each from the slot
    the rows before it fill.

    Args:
        indptr, offsets: ``(nq,)`` int64, contiguous: written, each row's first slot (from
            ``nnz`` on) and its band run's first slot.
        indices: ``(bound,)`` int32 (for ``Lk <= 2**31``) or int64, contiguous: the other
            components' keys are written at their slots (the band's are left to the band
            kernel).
        keys: at most :data:`UNION_MAX_LISTS` int64 ``(n_j,)`` tensors of ``row * max(Lk, 1)
            + key``, each sorted, all within these rows, disjoint and off the band.
        nnz: the first free slot.
    Returns:
        Each key's slot (one ``(n_j,)`` tensor per list) and the first free slot after the rows.
    """
    if not band_available():
        raise RuntimeError("the fused band kernel is not available here (see band_available)")
    nq = indptr.numel()
    for t, name, n in ((indptr, "indptr", nq), (offsets, "offsets", nq),
                       (indices, "indices", indices.numel())):
        _need(t, name, 1, _INDEX_DTYPES if t is indices else (torch.int64,))
        if t.numel() != n or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous ({n},) tensor, got "
                             f"{tuple(t.shape)}")
    _check_index_width(indices, lk)
    if len(keys) > UNION_MAX_LISTS:
        raise ValueError(f"at most {UNION_MAX_LISTS} key lists, got {len(keys)}")
    for t in keys:
        _need(t, "keys", 1, (torch.int64,))
    threads = torch.get_num_threads()
    if blocks is None:
        blocks = max(1, min(threads, nq // UNION_BLOCK_ROWS, UNION_MAX_BLOCKS))
    if isinstance(blocks, bool) or not isinstance(blocks, int) \
            or not 1 <= blocks <= UNION_MAX_BLOCKS:
        raise ValueError(f"blocks must be an int in [1, {UNION_MAX_BLOCKS}], got {blocks!r}")
    keys = [t.contiguous() for t in keys]
    pos = [torch.empty_like(t) for t in keys]
    out = torch.zeros(1, dtype=torch.int64)
    ptr = _i64s(indptr.data_ptr(), offsets.data_ptr(), indices.data_ptr(), out.data_ptr(),
                *(p_ for t, s in zip(keys, pos) for p_ in (t.data_ptr(), s.data_ptr())))
    geo = _i64s(nq, q0, lq, lk, lo, hi, nnz, indices.numel(), len(keys), blocks,
                indices.element_size(), *(t.numel() for t in keys))
    rc = _state["fn"]["band_union_layout"](ptr, geo, 1.0, threads, _state["fn"]["rt"])
    if rc == -2:
        raise RuntimeError("union_layout: the rows need more slots than indices holds")
    if rc == -3:
        raise ValueError("union_layout: keys must be sorted, disjoint, within the rows and off "
                         "the band")
    if rc == -1:
        raise RuntimeError("union_layout: some rows were not laid out (thread team)")
    if rc != 0:
        raise ValueError(f"union_layout: bad geometry nq={nq}, q0={q0}, Lq={lq}, Lk={lk}, "
                         f"lo={lo}, hi={hi}, nnz={nnz}")
    return pos, int(out)


def band_weights(qs: Tensor, k: Tensor, lse: Tensor, lo: int, hi: int, values: Tensor,
                 offsets: Tensor, indices: Tensor | None = None, scale: float = 1.0) -> None:
    """Write the band's attention weights ``exp(score - lse)`` straight into a CSR buffer: row
    ``i``'s allowed keys ``j`` (``lo <= j - i - (Lk - Lq) <= hi``, clipped to ``[0, Lk)``) go
    to ``values[h, offsets[i] + j - start_i]`` for every head ``h`` (``start_i``: the row's
    first key), and ``j`` to ``indices[offsets[i] + j - start_i]``. Nothing else is written.

    Args:
        qs: pre-scaled queries ``(B, Hkv, G, Lq, D)``, fp32 or fp64, CPU; k ``(B, Hkv, Lk, D)``.
        lse: ``(B, Hkv, G, Lq)``, the rows' log-sum-exp (it may span other components too;
            rows with ``-inf`` get weight 0).
        lo, hi: the band, ``lo <= hi``, ``hi - lo + 1 <= BAND_MAX_WIDTH``.
        values: ``(B * Hkv * G, ncols)`` of qs's dtype, contiguous rows (any row stride).
        offsets: ``(Lq,)`` int64, where each row's run starts; every run must lie in
            ``[0, ncols)``.
        indices: ``(ncols,)`` int32 or int64 contiguous, or None.
        scale: the scores' factor on ``qs`` (as :func:`band_forward`'s), finite.
    """
    if not band_available():
        raise RuntimeError("the fused band kernel is not available here (see band_available)")
    _need(qs, "qs", 5, tuple(_BAND_DTYPES))
    _need(k, "k", 4, (qs.dtype,))
    B, hkv, g, lq, d = qs.shape
    lk = k.shape[2]
    if k.shape[:2] != (B, hkv) or k.shape[3] != d:
        raise ValueError(f"k must be (B, Hkv, Lk, D) = ({B}, {hkv}, Lk, {d}), got "
                         f"{tuple(k.shape)}")
    _need(lse, "lse", 4, (qs.dtype,))
    if lse.shape != (B, hkv, g, lq):
        raise ValueError(f"lse must have shape {(B, hkv, g, lq)}, got {tuple(lse.shape)}")
    lo, hi = _int(lo, "lo"), _int(hi, "hi")
    if not (lo <= hi and hi - lo + 1 <= BAND_MAX_WIDTH):
        raise ValueError(f"need lo <= hi and hi - lo + 1 <= {BAND_MAX_WIDTH}, got lo={lo}, "
                         f"hi={hi}")
    _check_runs(values, offsets, indices, qs.dtype, B * hkv * g, lq, lk, lo, hi, 0, lq)
    _check_scale(scale)
    if B * hkv * g * lq == 0 or lk == 0:
        return
    if d == 0:  # every score is 0
        raise ValueError("qs and k need D >= 1 for the compiled kernel")
    _check_sizes(D=d, Lk=lk, Lq=lq)
    q = _rows_contiguous(qs.detach().reshape(B, hkv * g, lq, d))
    _band_weights_call(q, _rows_contiguous(k.detach()),
                       lse.detach().reshape(-1, lq).contiguous(), lo, hi, values, offsets,
                       indices, scale=float(scale))


def band_forward(qs: Tensor, k: Tensor, v: Tensor, lo: int, hi: int, q0: int,
                 q1: int, weights: tuple | None = None,
                 scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """Band attention of query rows ``[q0, q1)``: key ``j`` is allowed for query ``i`` iff
    ``lo <= j - i - (Lk - Lq) <= hi``.

    Args:
        qs: queries ``(B, Hkv, G, Lq, D)`` (grouped-query layout), pre-scaled unless ``scale``
            is given, fp32 (or fp64, for exactness checks), CPU; k and v of the same dtype.
        k: ``(B, Hkv, Lk, D)``; v: ``(B, Hkv, Lk, Dv)``; any strides (rows that are not
            contiguous are copied; batch and head strides, including 0, are read in place).
        lo, hi: ``lo <= hi``, ``hi - lo + 1 <= BAND_MAX_WIDTH``; ``0 <= q0 <= q1 <= Lq``.
        scale: the scores are ``scale * qs . k``, the product ``qs * scale`` taken in the
            kernel as the caller would take it (no scaled copy of the queries); finite.
        weights: optional ``(values, offsets, indices, key0[, other_lse])``: the
            probabilities of row ``q0 + r`` (its allowed keys ``j`` in order) are also written
            to ``values[h, offsets[r] + j - start]`` for every head ``h`` (as
            :func:`band_weights`, with ``offsets (q1 - q0,)``), and ``key0 + j`` to
            ``indices`` (or None); nothing else of the buffers is written. ``other_lse
            (B, Hkv, G, q1 - q0)``, contiguous: the log-sum-exp of the rows over the other
            components of a union; the weights written are then the union's,
            ``exp(s - logaddexp(lse_band, other_lse))`` (``out`` and ``lse`` stay the band's).
    Returns:
        ``out (B, Hkv, G, q1 - q0, Dv)`` and ``lse (B, Hkv, G, q1 - q0)`` (``-inf`` and zeros
        for rows without keys). Not differentiable by itself.
    """
    if not band_available():
        raise RuntimeError("the fused band kernel is not available here (see band_available)")
    _band_inputs(qs, k, v)
    B, hkv, g, lq, d = qs.shape
    lk, dv = k.shape[2], v.shape[3]
    lo, hi, q0, q1 = (_int(x, n) for x, n in ((lo, "lo"), (hi, "hi"), (q0, "q0"), (q1, "q1")))
    if not (lo <= hi and hi - lo + 1 <= BAND_MAX_WIDTH):
        raise ValueError(f"need lo <= hi and hi - lo + 1 <= {BAND_MAX_WIDTH}, got lo={lo}, "
                         f"hi={hi}")
    if not 0 <= q0 <= q1 <= lq:
        raise ValueError(f"need 0 <= q0 <= q1 <= Lq = {lq}, got q0={q0}, q1={q1}")
    _check_scale(scale)
    if weights is not None:
        values, offsets, indices, key0, *other = weights
        _check_runs(values, offsets, indices, qs.dtype, B * hkv * g, lq, lk, lo, hi, q0, q1)
        if not isinstance(key0, int) or key0 < 0:
            raise TypeError(f"weights' key0 must be an int >= 0, got {key0!r}")
        if len(other) > 1:
            raise ValueError(f"weights must have 4 or 5 entries, got {len(weights)}")
        if other and other[0] is not None:
            _need(other[0], "other_lse", 4, (qs.dtype,))
            if other[0].shape != (B, hkv, g, q1 - q0) or not other[0].is_contiguous():
                raise ValueError(f"other_lse must be contiguous (B, Hkv, G, q1 - q0) = "
                                 f"({B}, {hkv}, {g}, {q1 - q0}), got {tuple(other[0].shape)}")
    if B * hkv * g * (q1 - q0) * dv == 0:
        return qs.new_zeros(B, hkv, g, q1 - q0, dv), qs.new_full((B, hkv, g, q1 - q0), -math.inf)
    _check_sizes(D=d, Dv=dv, Lk=max(lk, 1), Lq=lq)
    if lk == 0:
        return qs.new_zeros(B, hkv, g, q1 - q0, dv), qs.new_full((B, hkv, g, q1 - q0), -math.inf)
    # rows must be contiguous; batch and head strides are passed, so a chunk's slices of
    # longer tensors are read in place instead of copied
    q = _rows_contiguous(qs.detach().reshape(B, hkv * g, lq, d))
    out, lse = _call(q, _rows_contiguous(k.detach()), _rows_contiguous(v.detach()), lo, hi, q0,
                     q1, weights=weights, scale=float(scale))
    return (out.view(B, hkv, g, q1 - q0, dv), lse.view(B, hkv, g, q1 - q0))


def band_backward(qs: Tensor, k: Tensor, v: Tensor, dout: Tensor, lse: Tensor,
                  dlse: Tensor | None, lo: int, hi: int) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`band_forward` over all rows (``q0 = 0``, ``q1 = Lq``): the
    probabilities are recomputed from ``q``, ``k`` and the forward's ``lse`` (nothing of size
    ``Lq x window`` is kept between the passes).

    Args:
        qs, k, v, lo, hi: as given to :func:`band_forward` (``qs (B, Hkv, G, Lq, D)``
            pre-scaled; any strides).
        dout: gradient of ``out``, ``(B, Hkv, G, Lq, Dv)``, any strides.
        lse: the forward's ``lse (B, Hkv, G, Lq)``.
        dlse: gradient of ``lse`` (same shape; it reaches the scores as ``P * dlse``), or None.
    Returns:
        ``(dqs, dk, dv)``: gradients with respect to ``qs``, ``k``, ``v``, contiguous, shaped
        like them (a stride-0 ``k`` or ``v`` gets the full-size gradient; autograd sums it).
    """
    if not band_available():
        raise RuntimeError("the fused band kernel is not available here (see band_available)")
    _band_inputs(qs, k, v)
    B, hkv, g, lq, d = qs.shape
    lk, dv = k.shape[2], v.shape[3]
    for t, name, shape in ((dout, "dout", (B, hkv, g, lq, dv)), (lse, "lse", (B, hkv, g, lq)),
                           (dlse, "dlse", (B, hkv, g, lq))):
        if t is None and name == "dlse":
            continue
        _need(t, name, len(shape), (qs.dtype,))
        if t.shape != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    lo, hi = _int(lo, "lo"), _int(hi, "hi")
    if not (lo <= hi and hi - lo + 1 <= BAND_MAX_WIDTH):
        raise ValueError(f"need lo <= hi and hi - lo + 1 <= {BAND_MAX_WIDTH}, got lo={lo}, "
                         f"hi={hi}")
    if B * hkv * g * lq == 0 or lk == 0 or d == 0 or dv == 0:
        return qs.new_zeros(qs.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    _check_sizes(D=d, Dv=dv, Lk=lk, Lq=lq)
    q = _rows_contiguous(qs.detach().reshape(B, hkv * g, lq, d))
    do = _rows_contiguous(dout.detach().reshape(B, hkv * g, lq, dv))
    dq, dk, dvv = _band_backward_call(
        q, _rows_contiguous(k.detach()), _rows_contiguous(v.detach()), do,
        lse.detach().reshape(B, hkv * g, lq).contiguous(),
        None if dlse is None else dlse.detach().reshape(B, hkv * g, lq).contiguous(), lo, hi)
    return dq.view(qs.shape), dk, dvv


# ------------------------------------------------------------------------ decoding attention

def _decode_call(q: Tensor, k: Tensor, v: Tensor, nsplit: int, scale: float, ks: int,
                 vs: int) -> tuple[Tensor, Tensor]:
    """q ``(BH, M, d)`` contiguous; head ``i``'s keys/values start ``i * ks`` / ``i * vs``
    elements into ``k`` / ``v``, rows contiguous (already checked); ``nsplit`` key chunks per
    head (0: the kernel's choice for its team)."""
    fns = _decode_state["fn"]
    bh, m, d = q.shape
    lk, dv = k.shape[-2], v.shape[-1]
    assert q.is_contiguous() and _rows_ok(k) and _rows_ok(v)
    out = q.new_empty(bh, m, dv)
    lse = q.new_empty(bh, m)
    rc = fns["decode_forward"](
        _i64s(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr()),
        _i64s(bh, m, lk, d, dv, ks, vs, nsplit), scale, torch.get_num_threads(), fns["rt"])
    if rc != 0:
        raise MemoryError("attnkit decoding kernel: out of memory for its buffers")
    return out, lse


def decode_forward(q: Tensor, k: Tensor, v: Tensor,
                   scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """Every query row attends to every key (a cached decoding step), split over keys so all
    threads work even with one key/value head.

    Args:
        q: queries ``(B, Hkv, R, D)``: the ``R`` rows sharing each key/value head (a group's
            query heads times the new positions), fp32 CPU; scores are ``scale * q.k``.
        k: ``(B, Hkv, Lk, D)``; v: ``(B, Hkv, Lk, Dv)``, any strides: views into a longer
            preallocated cache, heads expanded over the batch (stride 0) and odd strides on
            size-1 dims are read in place; layouts the kernel cannot address (rows not
            contiguous, batch and head strides that do not merge) are copied.
    Returns:
        ``out (B, Hkv, R, Dv)`` and ``lse (B, Hkv, R)``. Not differentiable.
    """
    if not decode_available():
        raise RuntimeError("the native decoding kernel is not available here (see "
                           "decode_available)")
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        _need(t, name, 4)
    B, hkv, rows, d = q.shape
    lk, dv = k.shape[2], v.shape[3]
    if k.shape[:2] != (B, hkv) or v.shape[:3] != k.shape[:3] or k.shape[3] != d:
        raise ValueError(f"k must be (B, Hkv, Lk, D) = ({B}, {hkv}, Lk, {d}) and v (B, Hkv, Lk, "
                         f"Dv) with the same Lk; got k {tuple(k.shape)}, v {tuple(v.shape)}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    if B * hkv * rows * dv == 0 or lk == 0:
        return q.new_zeros(B, hkv, rows, dv), q.new_full((B, hkv, rows), -math.inf)
    _check_sizes(D=d, Dv=dv, Lk=lk, rows=rows)
    q = q.detach().reshape(B * hkv, rows, d).contiguous()

    def heads_ok(t: Tensor) -> tuple[Tensor, int]:
        # each head's rows contiguous and the B * Hkv heads evenly spaced (the kernel takes one
        # stride between heads); a view into a longer cache is fine
        t = _rows_contiguous(t.detach())
        s = _merged_stride(t)
        if s is None:
            t = t.contiguous()
            s = _merged_stride(t)
        return t, s

    (k, ks), (v, vs) = heads_ok(k), heads_ok(v)
    # nsplit 0: the kernel splits each head's keys for the team (decode_cpu.c's decode_split)
    out, lse = _decode_call(q, k, v, 0, scale, ks, vs)
    return out.view(B, hkv, rows, dv), lse.view(B, hkv, rows)


# ------------------------------------------------------------------------ decoding GEMV

_gemv_state: dict = {}
#: Most rows :func:`gemv_rows` takes (a decoding step's tokens x batch); more rows are a GEMM.
GEMV_MAX_ROWS = 4


def _load_gemv():
    lib = ctypes.CDLL(str(_build(_GEMV_SOURCE)))
    _register(lib)
    # team.h's own pool, as the decoding kernel (see _load_decode); no BLAS needed
    return _entry(lib, "gemv_rows"), (ctypes.c_void_p * 4)()


def gemv_reference(x: Tensor, weights, biases=None, *, gelu: bool = False,
                   residual: Tensor | None = None, layer_norm=None, rope=None) -> Tensor:
    """What :func:`gemv_multi` computes, in fp64 with plain torch ops (for self-checks and
    tests): ``(rows, sum(out_i))`` for the ``rows`` rows of ``x (..., in)``."""
    import torch.nn.functional as F

    biases = (None,) * len(weights) if biases is None else biases
    xd = x.double().reshape(-1, x.shape[-1])
    if layer_norm is not None:
        w_ln, b_ln, eps = layer_norm
        xd = F.layer_norm(xd, (xd.shape[-1],), None if w_ln is None else w_ln.double(),
                          None if b_ln is None else b_ln.double(), float(eps))
    y = torch.cat([F.linear(xd, w.double(), None if b is None else b.double())
                   for w, b in zip(weights, biases)], -1)
    if gelu:
        y = F.gelu(y)
    if residual is not None:
        y = y + residual.double().reshape(y.shape)
    if rope is not None:
        cos, sin, cols = rope
        length, d = cos.shape
        pos = torch.arange(y.shape[0]) % length  # row r holds position r % L
        yc = y[:, :cols].reshape(y.shape[0], cols // d, d)
        swapped = torch.cat([yc[..., d // 2:], yc[..., :d // 2]], -1)
        rot = yc * cos.double()[pos, None] + swapped * sin.double()[pos, None]
        y = torch.cat([rot.reshape(y.shape[0], cols), y[:, cols:]], -1)
    return y


def _gemv_tolerance(x: Tensor, weights, biases, residual, layer_norm) -> float:
    """Error allowed for fp32 :func:`gemv_multi`: a dot product of ``in`` terms carries about
    ``sqrt(in) * eps`` times the sum of its terms' magnitudes (times 16 for margin, +4 eps for
    the bias, GELU, LayerNorm and rotation steps); LayerNorm's inputs are its fp64 outputs."""
    xd = gemv_reference(x, [torch.eye(x.shape[-1])], layer_norm=layer_norm)  # normalized rows
    mag = max(float((xd.abs() @ w.double().abs().T).max()) for w in weights)
    extra = [b for b in biases if b is not None] + ([residual] if residual is not None else [])
    mag += sum(float(t.abs().max()) for t in extra)
    return 16 * _EPS32 * (math.sqrt(x.shape[-1]) + 4) * max(mag, 1e-30)


def _gemv_self_check() -> None:
    g = torch.Generator().manual_seed(0)
    for rows, out_f, in_f in ((1, 37, 21), (3, 64, 48)):
        x, w = torch.randn(rows, in_f, generator=g), torch.randn(out_f, in_f, generator=g)
        b = torch.randn(out_f, generator=g)
        for bias in (None, b):
            tol = _gemv_tolerance(x, (w,), (bias,), None, None)
            for gelu in (False, True):
                _compare(f"GEMV {rows}x{in_f} -> {out_f} bias={bias is not None} gelu={gelu}",
                         _gemv_call(x, (w,), (bias,), gelu),
                         gemv_reference(x, (w,), (bias,), gelu=gelu), tol)
        # three segments of one output row (odd sizes: a segment boundary inside a 4-row group),
        # LayerNorm, residual and rotary steps
        w2, w3 = torch.randn(5, in_f, generator=g), torch.randn(12, in_f, generator=g)
        ln = (torch.randn(in_f, generator=g), torch.randn(in_f, generator=g), 1e-5)
        res = torch.randn(rows, out_f + 17, generator=g)
        cos, sin = torch.randn(2, rows, 4, generator=g)
        args = ((w, w2, w3), (b, None, None))
        kw = {"residual": res, "layer_norm": ln, "rope": (cos, sin, 36)}
        _compare(f"GEMV {rows} rows, three weights, LayerNorm, residual, rotary",
                 _gemv_call(x, *args, False, **kw), gemv_reference(x, *args, **kw),
                 3 * _gemv_tolerance(x, args[0], args[1], res, ln))


def gemv_available() -> bool:
    """Whether the decoding GEMV kernel is built, loaded and checked (built on the first call)."""
    return _available(_gemv_state, _load_gemv, _gemv_self_check, "native GEMV kernel")


# Slots of gemv_rows's ptr / geo arrays (gemv_cpu.c) that change from call to call.
_GP_X, _GP_Y, _GP_RES, _GP_COS, _GP_SIN = 0, 1, 8, 11, 12
_GG_ROWS, _GG_ROPE_LEN = 0, 10


def _gemv_arrays(weights, bias_ptrs, ln_ptrs: tuple[int, int], gelu: bool, layer_norm: bool,
                 rope_cols: int, rope_dim: int):
    """``(ptr, geo)`` as gemv_cpu.c's ``gemv_rows`` reads them, with the per-call slots (x,
    y, residual, rotary tables; rows, rotary length) left 0 for the caller to write."""
    n = len(weights)
    w = [t.data_ptr() for t in weights] + [0] * (3 - n)
    o = [t.shape[0] for t in weights] + [0] * (3 - n)
    ptr = _i64s(0, 0, *w, *bias_ptrs, *[0] * (3 - n), 0, *ln_ptrs, 0, 0)
    geo = _i64s(0, weights[0].shape[1], n, *o, int(gelu), int(layer_norm), rope_cols, rope_dim,
                0)
    return ptr, geo


def _gemv_call(x: Tensor, weights, biases, gelu: bool, residual: Tensor | None = None,
               layer_norm=None, rope=None) -> Tensor:
    """Every tensor contiguous fp32 CPU of the sizes :func:`_check_gemv` checks."""
    fn, rt = _gemv_state["fn"]
    ln_w, ln_b, eps = (None, None, 0.0) if layer_norm is None else layer_norm
    cos, sin, cols, dim, length = _rope_args(rope)
    ptr, geo = _gemv_arrays(weights, [0 if t is None else t.data_ptr() for t in biases],
                            (0 if ln_w is None else ln_w.data_ptr(),
                             0 if ln_b is None else ln_b.data_ptr()),
                            gelu, layer_norm is not None, cols, dim)
    rows = x.numel() // weights[0].shape[1]
    y = x.new_empty(rows, sum(t.shape[0] for t in weights))
    ptr[_GP_X], ptr[_GP_Y], ptr[_GP_COS], ptr[_GP_SIN] = x.data_ptr(), y.data_ptr(), cos, sin
    ptr[_GP_RES] = 0 if residual is None else residual.data_ptr()
    geo[_GG_ROWS], geo[_GG_ROPE_LEN] = rows, length
    rc = fn(ptr, geo, float(eps), torch.get_num_threads(), rt)
    if rc != 0:
        raise MemoryError("attnkit GEMV kernel: out of memory for the normalized rows")
    return y


def _rope_args(rope) -> tuple[int, int, int, int, int]:
    if rope is None:
        return 0, 0, 0, 0, 0
    cos, signed_sin, cols = rope
    return cos.data_ptr(), signed_sin.data_ptr(), cols, cos.shape[1], cos.shape[0]


def gemv_rows(x: Tensor, weight: Tensor, bias: Tensor | None = None, *,
              gelu: bool = False) -> Tensor:
    """``F.linear(x, weight, bias)`` (then ``F.gelu`` with ``gelu=True``, in the same pass) for
    ``x (..., in)`` with at most :data:`GEMV_MAX_ROWS` rows, ``weight (out, in)`` contiguous,
    ``bias (out,)``: fp32 CPU tensors; not differentiable (the caller checks that no gradient
    is needed). Returns ``(..., out)``."""
    return gemv_multi(x, (weight,), (bias,), gelu=gelu)


#: Most weights one :func:`gemv_multi` call takes.
GEMV_MAX_WEIGHTS = 3


def gemv_multi(x: Tensor, weights, biases=None, *, gelu: bool = False,
               residual: Tensor | None = None, layer_norm=None, rope=None,
               check: bool = True) -> Tensor:
    """``torch.cat([F.linear(x, w, b) for w, b in zip(weights, biases)], -1)`` in one pass of
    the thread team (e.g. a layer's query, key and value projections of one token), with the
    steps around it a decoding block needs fused in.

    Args:
        x: ``(..., in)`` with at most :data:`GEMV_MAX_ROWS` rows, fp32 CPU.
        weights: 1 to :data:`GEMV_MAX_WEIGHTS` contiguous ``(out_i, in)`` fp32 CPU tensors.
        biases: ``None`` or one ``(out_i,)`` tensor or ``None`` per weight.
        gelu: apply the exact GELU to the whole output in the same pass.
        residual: ``(..., sum(out_i))`` added last (a residual connection), or ``None``.
        layer_norm: ``(weight, bias, eps)`` (weight/bias ``(in,)`` or ``None``): multiply
            ``F.layer_norm(x, (in,), weight, bias, eps)`` instead of ``x``.
        rope: ``(cos, signed_sin, cols)``: rotate the first ``cols`` output columns (heads of
            ``D`` channels, ``cols % D == 0``) by rotary position embeddings, "rotate-half"
            layout: ``y * cos + swap_halves(y) * signed_sin`` per head, with ``(L, D)`` fp32
            tables for the ``L`` positions of ``x (..., L, in)`` (``signed_sin`` = ``sin`` with
            rotate-half's sign folded in, as :class:`attnkit.nn.RotaryEmbedding` keeps it).
            Applied last.
        check: validate shapes, dtypes and devices (``False``: the caller already has; a
            decoding step saves the microseconds). Strides are handled either way: every
            vector, ``x``, ``residual`` and the rotary tables are read through a contiguous
            copy when they are not contiguous (a strided or expanded bias is not misread).
    Returns:
        ``(..., sum(out_i))``. Not differentiable (the caller checks that no gradient is
        needed).
    """
    if not gemv_available():
        raise RuntimeError("the native GEMV kernel is not available here (see gemv_available)")
    biases = (None,) * len(weights) if biases is None else biases
    if check:
        weights, biases = tuple(weights), tuple(biases)
        _check_gemv(x, weights, biases, residual, layer_norm, rope)
    # the kernel reads every operand as contiguous memory: contiguous() is free when it is
    biases = tuple(None if b is None else b.contiguous() for b in biases)
    if residual is not None:
        residual = residual.contiguous()
    if layer_norm is not None:
        w_ln, b_ln, eps = layer_norm
        layer_norm = (None if w_ln is None else w_ln.contiguous(),
                      None if b_ln is None else b_ln.contiguous(), eps)
    if rope is not None:
        rope = (rope[0].contiguous(), rope[1].contiguous(), int(rope[2]))
    out = _gemv_call(x.contiguous(), weights, biases, gelu, residual, layer_norm, rope)
    return out.view(*x.shape[:-1], out.shape[-1])


def _check_gemv(x: Tensor, weights, biases, residual, layer_norm, rope) -> None:
    if not 1 <= len(weights) <= GEMV_MAX_WEIGHTS or len(biases) != len(weights):
        raise ValueError(f"weights: 1 to {GEMV_MAX_WEIGHTS} tensors, and one bias (or None) "
                         f"each; got {len(weights)} weights and {len(biases)} biases")
    in_f = x.shape[-1] if x.dim() else 0
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError(f"x must be fp32 on CPU, got {x.dtype} on {x.device}")
    if not 0 < x.numel() <= GEMV_MAX_ROWS * in_f:
        raise ValueError(f"x must hold 1 to {GEMV_MAX_ROWS} rows, got shape {tuple(x.shape)}")

    def vector(t, name: str, n: int) -> None:
        if t is not None and (not isinstance(t, Tensor) or t.shape != (n,)
                              or t.dtype != torch.float32 or t.device.type != "cpu"):
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be None or an fp32 CPU ({n},) tensor, got {got}")

    for i, (w, b) in enumerate(zip(weights, biases)):
        if (not isinstance(w, Tensor) or w.dim() != 2 or w.shape[1] != in_f
                or w.dtype != torch.float32 or w.device.type != "cpu" or not w.is_contiguous()):
            got = f"{w.dtype} {tuple(w.shape)}" if isinstance(w, Tensor) else type(w).__name__
            raise ValueError(f"weights[{i}] must be a contiguous fp32 CPU (out, {in_f}) tensor, "
                             f"got {got}")
        vector(b, f"biases[{i}]", w.shape[0])
    total = sum(w.shape[0] for w in weights)
    if residual is not None and (residual.shape != (*x.shape[:-1], total)
                                 or residual.dtype != torch.float32
                                 or residual.device.type != "cpu"):
        raise ValueError(f"residual must be an fp32 CPU {(*x.shape[:-1], total)} tensor, got "
                         f"{residual.dtype} {tuple(residual.shape)}")
    if layer_norm is not None:
        if not isinstance(layer_norm, tuple) or len(layer_norm) != 3:
            raise ValueError("layer_norm must be a (weight, bias, eps) tuple")
        vector(layer_norm[0], "layer_norm weight", in_f)
        vector(layer_norm[1], "layer_norm bias", in_f)
        if not float(layer_norm[2]) >= 0:
            raise ValueError(f"layer_norm eps must be >= 0, got {layer_norm[2]}")
    if rope is not None:
        if not isinstance(rope, tuple) or len(rope) != 3:
            raise ValueError("rope must be a (cos, signed_sin, cols) tuple")
        cos, sin, cols = rope
        length = x.shape[-2] if x.dim() >= 2 else 1
        for name, t in (("cos", cos), ("signed_sin", sin)):
            if (not isinstance(t, Tensor) or t.dim() != 2 or t.shape[0] != length
                    or t.shape[1] < 2 or t.shape[1] % 2 or t.dtype != torch.float32
                    or not t.is_cpu or t.shape != cos.shape):
                raise ValueError(f"rope {name} must be an fp32 CPU (L, D) table with L = "
                                 f"{length} positions and an even D")
        d = cos.shape[1]
        if isinstance(cols, bool) or not isinstance(cols, int) or not 0 <= cols <= total \
                or cols % d:
            raise ValueError(f"rope cols must be a multiple of D = {d} in [0, {total}], "
                             f"got {cols!r}")


class PreparedGemv:
    """:func:`gemv_multi` with its weights, biases, LayerNorm and GELU bound once, for a call
    made every decoding step: the kernel's argument arrays are built here, and a call only
    writes the addresses that change (``x``, the output, the residual, the rotary rows). It
    saves the ~15 us of argument handling a :func:`gemv_multi` call costs, ~25 times a step.

    The bound tensors' memory is read at every call (in-place updates are seen); a parameter
    whose ``.data`` is replaced afterwards is not (the caller rebinds: see
    :mod:`attnkit.lm.model`). Strided bias and LayerNorm vectors are bound as contiguous
    copies.

    Args:
        weights, biases, gelu, layer_norm: as in :func:`gemv_multi` (checked here).
        rope_cols, rope_dim: rotate the first ``rope_cols`` output columns in heads of
            ``rope_dim`` channels (0: no rotary embedding); the tables come with each call.
    """

    def __init__(self, weights, biases=None, *, gelu: bool = False, layer_norm=None,
                 rope_cols: int = 0, rope_dim: int = 0) -> None:
        if not gemv_available():
            raise RuntimeError("the native GEMV kernel is not available here (see "
                               "gemv_available)")
        weights = tuple(weights)
        biases = (None,) * len(weights) if biases is None else tuple(biases)
        if not weights:
            raise ValueError("weights must hold at least one tensor")
        in_f = weights[0].shape[-1] if isinstance(weights[0], Tensor) and weights[0].dim() else 0
        if in_f < 1:
            raise ValueError("weights[0] must be a (out, in) tensor with in >= 1")
        table = torch.zeros(1, rope_dim) if rope_cols else None
        rope = (table, table, rope_cols) if rope_cols else None
        _check_gemv(torch.empty(1, in_f), weights, biases, None, layer_norm, rope)
        self.in_features = in_f
        self.out_features = sum(w.shape[0] for w in weights)
        self.rope_dim = rope_dim if rope_cols else 0
        ln_w, ln_b, eps = (None, None, 0.0) if layer_norm is None else layer_norm
        # the kernel reads these addresses at every call: keep the tensors (and contiguous
        # copies of strided vectors) alive as long as this object
        self._keep: list[Tensor] = list(weights)

        def address(t: Tensor | None) -> int:
            if t is None:
                return 0
            t = t.contiguous()
            self._keep.append(t)
            return t.data_ptr()

        self._ptrs, self._geo = _gemv_arrays(weights, [address(t) for t in biases],
                                             (address(ln_w), address(ln_b)), gelu,
                                             layer_norm is not None, rope_cols, self.rope_dim)
        self._eps = float(eps)

    def __call__(self, x: Tensor, out: Tensor, residual: Tensor | None = None,
                 rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Write the product of ``x (rows, in)`` into ``out (rows, out_features)`` (then add
        ``residual``, of ``out``'s shape) and return ``out``. ``x``, ``out`` and ``residual``
        are contiguous fp32 CPU tensors; ``rope``: ``(cos, signed_sin)`` contiguous
        ``(L, rope_dim)`` tables for the positions of the rows (row ``r`` at position
        ``r % L``: ``L`` new tokens of each sequence), when bound with ``rope_cols``."""
        rows = x.shape[0] if x.dim() == 2 else 0
        if (x.dim() != 2 or x.shape[1] != self.in_features or not 1 <= rows <= GEMV_MAX_ROWS
                or out.shape != (rows, self.out_features) or not x.is_contiguous()
                or not out.is_contiguous() or x.dtype != torch.float32
                or out.dtype != torch.float32 or not x.is_cpu or not out.is_cpu):
            raise ValueError(f"x must be a contiguous fp32 CPU (rows <= {GEMV_MAX_ROWS}, "
                             f"{self.in_features}) tensor and out (rows, {self.out_features}); "
                             f"got {tuple(x.shape)} and {tuple(out.shape)}")
        # copies of the bound arrays: concurrent calls (two threads decoding with one model)
        # must not see each other's addresses
        ptrs = type(self._ptrs).from_buffer_copy(self._ptrs)
        geo = type(self._geo).from_buffer_copy(self._geo)
        ptrs[_GP_X], ptrs[_GP_Y] = x.data_ptr(), out.data_ptr()
        if residual is not None:
            if (residual.shape != out.shape or not residual.is_contiguous()
                    or residual.dtype != torch.float32 or not residual.is_cpu):
                raise ValueError(f"residual must be a contiguous fp32 CPU {tuple(out.shape)} "
                                 f"tensor, got {tuple(residual.shape)}")
            ptrs[_GP_RES] = residual.data_ptr()
        if self.rope_dim:
            if rope is None:
                raise ValueError("rope tables are needed: this product was bound with rope_cols")
            cos, sin = rope
            length = cos.shape[0] if cos.dim() == 2 else 0
            for t in (cos, sin):
                if (t.dim() != 2 or t.shape != (length, self.rope_dim) or length < 1
                        or rows % length or not t.is_contiguous() or t.dtype != torch.float32
                        or not t.is_cpu):
                    raise ValueError(f"rope tables must be contiguous fp32 CPU (L, "
                                     f"{self.rope_dim}) tensors with L dividing the {rows} "
                                     f"rows, got {tuple(t.shape)}")
            ptrs[_GP_COS], ptrs[_GP_SIN] = cos.data_ptr(), sin.data_ptr()
            geo[_GG_ROPE_LEN] = length
        geo[_GG_ROWS] = rows
        fn, rt = _gemv_state["fn"]
        if fn(ptrs, geo, self._eps, torch.get_num_threads(), rt) != 0:
            raise MemoryError("attnkit GEMV kernel: out of memory for the normalized rows")
        return out


# ------------------------------------------------------------ a decoder block's step

_step_state: dict = {}


def _load_step():
    # one library, one pool: step_cpu.c compiles the GEMV and decoding kernels into its unit
    return _load_with_sgemm(_STEP_SOURCE, "block_step", "model_step", pool=True)


def decode_block_reference(x: Tensor, operands, k_cache: Tensor, v_cache: Tensor, pos: int,
                           num_heads: int, rope=None) -> tuple[Tensor, Tensor, Tensor]:
    """What :class:`PreparedDecodeBlock` computes, in fp64 with plain torch ops (for
    self-checks and tests): ``(out, k_cache, v_cache)``, the caches copied with row ``pos``
    written. ``operands`` as :class:`PreparedDecodeBlock` takes them; ``rope``: ``(cos,
    signed_sin)`` ``(1, head_dim)`` rows of the position, or None."""
    import torch.nn.functional as F

    (qw, kw, vw, qb, kb, vb, n1w, n1b, ow, ob, n2w, n2b, f1w, f1b, f2w, f2b, eps1, eps2) = operands
    def dd(t):
        return None if t is None else t.double()

    x = x.double()
    r, dim = x.shape
    hkv, cap, hd = k_cache.shape[1:]
    h, g = num_heads, num_heads // hkv
    xn = F.layer_norm(x, (dim,), dd(n1w), dd(n1b), eps1)
    q = F.linear(xn, dd(qw), dd(qb)).view(r, h, hd)
    k = F.linear(xn, dd(kw), dd(kb)).view(r, hkv, hd)
    v = F.linear(xn, dd(vw), dd(vb)).view(r, hkv, hd)
    if rope is not None:
        cos, sin = rope[0].double().view(hd), rope[1].double().view(hd)

        def rot(t):
            return t * cos + torch.cat([t[..., hd // 2:], t[..., :hd // 2]], -1) * sin

        q, k = rot(q), rot(k)
    kc, vc = k_cache.double().clone(), v_cache.double().clone()
    kc[:, :, pos], vc[:, :, pos] = k, v
    keys, values = kc[:, :, :pos + 1], vc[:, :, :pos + 1]  # (r, hkv, lk, hd)
    qg = q.view(r, hkv, g, hd)
    p = torch.softmax(qg @ keys.transpose(-1, -2) / math.sqrt(hd), dim=-1)
    heads = (p @ values).reshape(r, h * hd)
    x1 = x + F.linear(heads, dd(ow), dd(ob))
    hid = F.gelu(F.linear(F.layer_norm(x1, (dim,), dd(n2w), dd(n2b), eps2), dd(f1w), dd(f1b)))
    return x1 + F.linear(hid, dd(f2w), dd(f2b)), kc, vc


def _step_self_check() -> None:
    """A block with GQA 2:1, odd widths, rotary, two sequences, at a position past the first
    key chunk, against the fp64 reference."""
    g = torch.Generator().manual_seed(3)
    dim, h, hkv, hd, hidden, cap, pos, rows = 20, 4, 2, 6, 33, 300, 290, 2

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    operands = (rand(h * hd, dim), rand(hkv * hd, dim), rand(hkv * hd, dim), rand(h * hd),
                rand(hkv * hd), None, 1 + rand(dim), rand(dim), rand(dim, h * hd), rand(dim),
                1 + rand(dim), None, rand(hidden, dim), rand(hidden), rand(dim, hidden), rand(dim),
                1e-5, 1e-3)
    angles = rand(1, hd // 2) * 10
    rope = (torch.cat([angles, angles], -1).cos(), torch.cat([-angles.sin(), angles.sin()], -1))
    x, kc, vc = rand(rows, dim), rand(rows, hkv, cap, hd), rand(rows, hkv, cap, hd)
    ref, ref_k, ref_v = decode_block_reference(x, operands, kc, vc, pos, h, rope)
    block = PreparedDecodeBlock(operands, num_heads=h, num_kv_heads=hkv, rotary=True)
    out = block(x, torch.empty_like(x), kc, vc, pos, rope)
    tol = 64 * _EPS32 * max(dim, hidden) * float(ref.abs().max())
    _compare("decoder block step output", out, ref, tol)
    _compare("decoder block step keys", kc, ref_k, tol)
    _compare("decoder block step values", vc, ref_v, tol)
    # two blocks and the output layer in one call: the blocks chained, then LayerNorm + head
    x, kc, vc = rand(rows, dim), rand(rows, hkv, cap, hd), rand(rows, hkv, cap, hd)
    kc2, vc2 = kc.clone(), vc.clone()
    mid, ref_k, ref_v = decode_block_reference(x, operands, kc, vc, pos, h, rope)
    ref, ref_k2, ref_v2 = decode_block_reference(mid.float(), operands, kc2, vc2, pos, h, rope)
    head_w, norm_w = rand(7, dim), 1 + rand(dim)
    ref_logits = torch.nn.functional.layer_norm(ref, (dim,), norm_w.double(), None, 1e-5) \
        @ head_w.double().T
    model = PreparedDecodeModel((block, block), norm=(norm_w, None, 1e-5), head=(head_w, None))
    logits = torch.empty(rows, 7)
    out = model(x, torch.empty_like(x), ((kc, vc, pos), (kc2, vc2, pos)), (rope, rope), logits)
    _compare("decoder step output", out, ref, 2 * tol)
    _compare("decoder step keys", kc2, ref_k2, 2 * tol)
    _compare("decoder step logits", logits, ref_logits, 2 * tol)


def step_available() -> bool:
    """Whether the whole-block decoding step (``step_cpu.c``) is built, loaded and checked."""
    return _available(_step_state, _load_step, _step_self_check, "native decoder block step")


_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE, _MADV_COLLAPSE = 14, 25  # (MADV_COLLAPSE: Linux >= 6.1)
_madvise: list = []


def _madvise_fn():
    """libc's ``madvise`` on Linux (``ctypes``), else None; looked up once."""
    if not _madvise:
        fn = None
        if platform.system() == "Linux":
            try:
                fn = ctypes.CDLL(None, use_errno=True).madvise
                fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                fn.restype = ctypes.c_int
            except (OSError, AttributeError):
                fn = None
        _madvise.append(fn)
    return _madvise[0]


def back_with_huge_pages(tensors) -> int:
    """Ask the kernel (Linux ``madvise(MADV_COLLAPSE)``) to back the whole 2 MiB pages inside
    each tensor's memory, already written (e.g. a model's weights), with transparent huge pages
    now (memory not yet written: :func:`huge_page_empty`). Values, addresses and sharing stay
    as they are; only the physical pages change. A decoding step streams every weight and
    cached key from memory, and on the machine measured a stream over 4 KiB pages ran at
    ~0.6-0.85 of the read bandwidth one over huge pages reaches (a TLB miss at every 4 KiB
    page, each costlier in a virtual machine).
    Only whole 2 MiB pages inside a tensor qualify, so a tensor of a few MiB at an arbitrary
    address is partly covered; :func:`huge_page_empty` allocates memory that is covered whole.
    Best effort: returns the bytes advised (0 where the system refuses, e.g. older kernels,
    other systems, ``ATTNKIT_HUGE_PAGES=0``)."""
    if _env_off("ATTNKIT_HUGE_PAGES"):
        return 0
    fn = _madvise_fn()
    done = 0
    for t in tensors:
        if fn is None or not isinstance(t, Tensor) or not t.is_cpu or not t.is_contiguous():
            continue
        start = t.data_ptr()
        lo = -(-start // _HUGE_PAGE) * _HUGE_PAGE
        hi = (start + t.numel() * t.element_size()) // _HUGE_PAGE * _HUGE_PAGE
        if hi > lo and fn(lo, hi - lo, _MADV_COLLAPSE) == 0:
            done += hi - lo
    return done


def huge_page_empty(shapes, dtype: torch.dtype = torch.float32) -> list[Tensor]:
    """Uninitialized contiguous CPU tensors of these shapes, laid out one after another (each
    at a 64-byte boundary) in one buffer that starts on a 2 MiB boundary, its whole 2 MiB
    pages advised as transparent huge pages (``MADV_HUGEPAGE``) before anything is written:
    where the system grants them, the tensors' memory is on huge pages whole, where
    :func:`back_with_huge_pages` covers only the 2 MiB pages that happen to lie inside a
    tensor. For memory that a decoding step streams every time (weights, key/value caches).

    Each tensor has a storage of exactly its own bytes (a window onto the buffer, which stays
    allocated while any of them lives), so saving, pickling, sharing or checking one tensor
    for aliasing (e.g. ``safetensors``) sees only its own memory, as for ``torch.empty``.
    The buffer is fresh anonymous memory (``mmap``) of whole 2 MiB pages, so from 1 MiB in
    all (a multi-query layer's key/value cache) up to 2x the bytes asked for are reserved;
    plain ``torch.empty`` tensors where huge pages cannot help or are off: under 1 MiB in
    all, not Linux, ``ATTNKIT_HUGE_PAGES=0``."""
    shapes = [torch.Size(s) for s in shapes]
    item = torch.empty((), dtype=dtype).element_size()
    sizes = [s.numel() * item for s in shapes]
    offsets, total = [], 0
    for n in sizes:
        offsets.append(total)
        total += -(-n // 64) * 64
    fn = None if _env_off("ATTNKIT_HUGE_PAGES") else _madvise_fn()
    if fn is None or 2 * total < _HUGE_PAGE:
        return [torch.empty(s, dtype=dtype) for s in shapes]
    pages = -(-total // _HUGE_PAGE) * _HUGE_PAGE  # whole pages: < 2x the bytes asked for
    # fresh pages from the system (an allocator may hand out memory already touched, which
    # the advice no longer changes); private, not shared memory
    try:
        buf = mmap.mmap(-1, pages + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError:  # (e.g. a limit on mappings): torch's allocator may still manage
        return [torch.empty(s, dtype=dtype) for s in shapes]
    start = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    base = -(-start // _HUGE_PAGE) * _HUGE_PAGE
    fn(base, pages, _MADV_HUGEPAGE)  # best effort: 4 KiB pages else
    out = []
    for shape, offset, n in zip(shapes, offsets, sizes):
        if n == 0:
            out.append(torch.empty(shape, dtype=dtype))
            continue
        window = (ctypes.c_char * n).from_address(base + offset)
        window.buffer = buf  # the window keeps the buffer, each tensor its window
        out.append(torch.frombuffer(window, dtype=dtype).view(shape))
    return out


#: Buffers of at least this many bytes that :func:`recycled_empty` hands out are kept for
#: reuse once nothing holds them any more.
RECYCLE_MIN_BYTES = 4 << 20
#: How many such buffers are kept (the most recent; a weights call takes two: values and
#: indices).
RECYCLE_KEEP = 2
_recycled: list = []  # mmap buffers, least recently handed out first
_recycled_lock = threading.Lock()  # (threads calling at once must not take the same buffer)


def recycled_empty(shape, dtype: torch.dtype = torch.float32) -> Tensor:
    """An uninitialized contiguous CPU tensor, for large buffers a caller fills and returns
    again and again (the attention weights of long sequences): from
    :data:`RECYCLE_MIN_BYTES` on, its memory is an anonymous mapping that is kept after the
    tensor (and every view or other tensor sharing its storage) is gone, and handed out again
    for a later buffer of at most its size and more than half of it. The first touch of fresh
    memory is what the weights of a long sequence mostly add to its forward (at 64k tokens,
    window 128, 4 heads: 336 MB, ~55 ms of page faults on two threads); reused memory has its
    pages already. At most :data:`RECYCLE_KEEP` buffers are kept (the memory of one weights
    call stays resident after it until :func:`release_recycled` or the next calls);
    ``ATTNKIT_WEIGHTS_POOL=0`` turns this off (plain ``torch.empty``)."""
    shape = torch.Size(shape)
    n = shape.numel() * torch.empty((), dtype=dtype).element_size()
    if n < RECYCLE_MIN_BYTES or _env_off("ATTNKIT_WEIGHTS_POOL"):
        return torch.empty(shape, dtype=dtype)
    with _recycled_lock:
        buf = None
        for i in range(len(_recycled)):
            if n <= len(_recycled[i]) < 2 * n and _unheld(i):
                buf = _recycled.pop(i)
                break
        if buf is None:
            try:
                buf = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            except OSError:
                return torch.empty(shape, dtype=dtype)
        _recycled.append(buf)
        while len(_recycled) > RECYCLE_KEEP:  # the oldest goes (freed once no tensor holds it)
            _recycled.pop(0)
        window = (ctypes.c_char * n).from_buffer(buf)  # holds buf while a tensor on it lives
    return torch.frombuffer(window, dtype=dtype, count=shape.numel()).view(shape)


def _unheld(i: int) -> bool:
    """Whether nothing but the list holds kept buffer ``i`` (a tensor on it holds its ctypes
    window, which holds the buffer): its references are the list's and getrefcount's argument."""
    return sys.getrefcount(_recycled[i]) == 2


def release_recycled() -> int:
    """Let go of the buffers :func:`recycled_empty` keeps that no tensor holds (their memory
    goes back to the system); returns the bytes released."""
    freed = 0
    with _recycled_lock:
        for i in reversed(range(len(_recycled))):
            if _unheld(i):
                freed += len(_recycled.pop(i))
    return freed


# step_cpu.c's slots: block_step's ptr slots of the key cache (the value cache follows) and of
# the rotary cos row (the sine row follows); its geometry: slots per block, the position's
_BP_KBUF, _BP_COS = 18, 20
_BS_NGEO, _BS_POS = 9, 7
_MS_EMBED_ROWS = 4  # model_step's geometry slot of the embedding's rows


class PreparedDecodeBlock:
    """A pre-LN decoder block's cached decoding step as one native call (``step_cpu.c``):
    LayerNorm + q/k/v projections + rotary embedding, the new keys and values written into
    the caller's cache buffers, attention of each new row to every cached position, output
    projection + residual, LayerNorm + GELU MLP + residual. The weights are bound once; a call
    passes the rows, the cache buffers and the position. Inference only, fp32 on CPU.

    Args:
        operands: ``(q_w, k_w, v_w, q_b, k_b, v_b, norm1_w, norm1_b, out_w, out_b, norm2_w,
            norm2_b, fc1_w, fc1_b, fc2_w, fc2_b, eps1, eps2)``: projection weights ``(out,
            in)`` and biases (or None), LayerNorm weights and biases (or None) and eps; all
            contiguous fp32 CPU.
        num_heads, num_kv_heads: query and key/value heads (``num_heads % num_kv_heads == 0``).
        rotary: rotate queries and keys (rotate-half layout; tables come with each call).
    """

    def __init__(self, operands, *, num_heads: int, num_kv_heads: int, rotary: bool) -> None:
        if "fn" not in _step_state and not step_available():  # (loaded: its self-check)
            raise RuntimeError("the native decoder block step is not available here (see "
                               "step_available)")
        if len(operands) != 18:
            raise ValueError(f"operands must hold 18 entries, got {len(operands)}")
        (qw, kw, vw, qb, kb, vb, n1w, n1b, ow, ob, n2w, n2b, f1w, f1b, f2w, f2b, eps1, eps2) = \
            operands
        if (isinstance(num_heads, bool) or isinstance(num_kv_heads, bool)
                or not isinstance(num_heads, int) or not isinstance(num_kv_heads, int)
                or num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads):
            raise ValueError(f"num_heads and num_kv_heads must be positive ints, num_heads a "
                             f"multiple of num_kv_heads; got {num_heads!r}, {num_kv_heads!r}")
        dim = qw.shape[1] if isinstance(qw, Tensor) and qw.dim() == 2 else 0
        nq = qw.shape[0] if dim else 0
        if not dim or nq % num_heads:
            raise ValueError(f"q_w must be a (num_heads * head_dim, dim) tensor, got "
                             f"{tuple(qw.shape) if isinstance(qw, Tensor) else type(qw)}")
        hd = nq // num_heads
        if rotary and hd % 2:
            raise ValueError(f"rotary needs an even head_dim, got {hd}")
        hidden = f1w.shape[0] if isinstance(f1w, Tensor) and f1w.dim() == 2 else 0
        # every product checked as the GEMV checks it (shapes, dtypes, contiguity, vectors)
        _check_gemv(torch.empty(1, dim), (qw, kw, vw), (qb, kb, vb), None, (n1w, n1b, eps1),
                    None)
        if kw.shape[0] != num_kv_heads * hd or vw.shape[0] != num_kv_heads * hd:
            raise ValueError(f"k_w and v_w must be (num_kv_heads * head_dim, dim) = "
                             f"({num_kv_heads * hd}, {dim})")
        _check_gemv(torch.empty(1, nq), (ow,), (ob,), torch.empty(1, dim), None, None)
        if ow.shape[0] != dim or not hidden:
            raise ValueError(f"out_w must be ({dim}, {nq}) and fc1_w (hidden, {dim})")
        _check_gemv(torch.empty(1, dim), (f1w,), (f1b,), None, (n2w, n2b, eps2), None)
        _check_gemv(torch.empty(1, hidden), (f2w,), (f2b,), torch.empty(1, dim), None, None)
        for name, t in (("q_w", qw), ("k_w", kw), ("v_w", vw), ("out_w", ow), ("fc1_w", f1w),
                        ("fc2_w", f2w)):
            if not t.is_contiguous():
                raise ValueError(f"{name} must be contiguous")
        # the kernel reads these addresses at every call: keep the tensors alive here
        self._keep = [t.contiguous() if isinstance(t, Tensor) else t for t in operands[:16]]
        self._storages = _storages(self._keep)
        back_with_huge_pages(self._keep)  # the weights are streamed at every step
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, hd
        self.dim, self.hidden, self.rotary = dim, hidden, bool(rotary)
        self._eps = (ctypes.c_double * 2)(float(eps1), float(eps2))
        addr = [0 if t is None else t.data_ptr() for t in self._keep]
        # ptr slots as step_cpu.c's block_step reads them: x, out, the 16 operands, the two
        # caches, the rotary rows (x, out, caches and rotary rows are written per call)
        self._ptrs = _i64s(0, 0, *addr, 0, 0, 0, 0, ctypes.addressof(self._eps))

    def _bind_caches(self, ptrs, at: int, rows: int, k_cache: Tensor, v_cache: Tensor) -> int:
        """Check one call's cache buffers and write their addresses into ``ptrs`` (this block's
        slots start at ``at``); returns their capacity (positions)."""
        cache_shape = (rows, self.num_kv_heads, k_cache.shape[2] if k_cache.dim() == 4 else 0,
                       self.head_dim)
        for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
            if (t.shape != cache_shape or not t.is_contiguous() or t.dtype != torch.float32
                    or not t.is_cpu):
                raise ValueError(f"{name} must be a contiguous fp32 CPU {cache_shape} tensor, "
                                 f"got {t.dtype} {tuple(t.shape)}")
        ptrs[at + _BP_KBUF], ptrs[at + _BP_KBUF + 1] = k_cache.data_ptr(), v_cache.data_ptr()
        return cache_shape[2]

    def _check_rope(self, rope, rows: int | None) -> None:
        """Check the rotary ``(cos, signed_sin)`` rows (``rows`` of them; None: any number)."""
        if rope is None or len(rope) != 2:
            raise ValueError("rope (cos, signed_sin) rows are needed: bound with rotary")
        n = rope[0].shape[0] if isinstance(rope[0], Tensor) and rope[0].dim() == 2 else 0
        for t in rope:
            if (not isinstance(t, Tensor) or t.shape != (rows or n, self.head_dim) or not n
                    or not t.is_contiguous() or t.dtype != torch.float32 or not t.is_cpu):
                raise ValueError(f"rope rows must be contiguous fp32 CPU ({rows or 'n'}, "
                                 f"{self.head_dim}) tensors, got "
                                 f"{tuple(t.shape) if isinstance(t, Tensor) else type(t)}")

    def _geo(self, rows: int, cap: int, pos: int) -> tuple[int, ...]:
        return (rows, self.dim, self.num_heads, self.num_kv_heads, self.head_dim, self.hidden,
                cap, pos, int(self.rotary))

    def _bind(self, ptrs, at: int, rows: int, k_cache: Tensor, v_cache: Tensor, pos: int,
              rope) -> tuple[int, ...]:
        """Check one call's cache buffers, position and rotary rows, write their addresses
        into ``ptrs`` (this block's slots start at ``at``), return its geometry slots."""
        cap = self._bind_caches(ptrs, at, rows, k_cache, v_cache)
        if isinstance(pos, bool) or not isinstance(pos, int) or not 0 <= pos < cap:
            raise ValueError(f"pos must be an int in [0, {cap}) (the cache's capacity), got "
                             f"{pos!r}")
        if self.rotary:
            self._check_rope(rope, 1)
            ptrs[at + _BP_COS], ptrs[at + _BP_COS + 1] = rope[0].data_ptr(), rope[1].data_ptr()
        return self._geo(rows, cap, pos)

    def __call__(self, x: Tensor, out: Tensor, k_cache: Tensor, v_cache: Tensor, pos: int,
                 rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """``x (R, dim)``: the new token of each of ``R`` sequences at position ``pos``;
        ``k_cache``, ``v_cache``: ``(R, num_kv_heads, capacity, head_dim)`` contiguous
        buffers holding positions ``0 .. pos - 1``, row ``pos`` is written; ``rope``: ``(cos,
        signed_sin)`` contiguous ``(1, head_dim)`` rows for ``pos`` when bound with rotary.
        Writes ``out (R, dim)`` (not ``x``) and returns it."""
        rows = _check_rows(x, out, self.dim)
        ptrs = type(self._ptrs).from_buffer_copy(self._ptrs)  # concurrent calls stay apart
        ptrs[0], ptrs[1] = x.data_ptr(), out.data_ptr()
        geo = _i64s(*self._bind(ptrs, 0, rows, k_cache, v_cache, pos, rope))
        fns = _step_state["fn"]
        rc = fns["block_step"](ptrs, geo, 1.0 / math.sqrt(self.head_dim),
                               torch.get_num_threads(), fns["rt"])
        if rc != 0:
            raise MemoryError("attnkit decoder block step: out of memory for its buffers")
        return out


def _storages(tensors) -> list:
    """The storages of these tensors (other entries skipped), for a bound step to hold: the
    memory it reads stays allocated even if a tensor's ``.data`` is replaced meanwhile (from
    another thread, during a step), so a step never reads freed memory; the callers' checks see
    the change before the next step."""
    return [t.untyped_storage() for t in tensors if isinstance(t, Tensor)]


def _check_rows(x: Tensor, out: Tensor, dim: int) -> int:
    """The rows of a decoding step's input ``x (R, dim)`` and output ``out`` (same shape,
    another tensor): contiguous fp32 CPU, ``R >= 1``. Returns ``R``."""
    rows = x.shape[0] if x.dim() == 2 else 0
    for name, t in (("x", x), ("out", out)):
        if (t.shape != (rows, dim) or not t.is_contiguous() or t.dtype != torch.float32
                or not t.is_cpu):
            raise ValueError(f"{name} must be a contiguous fp32 CPU {(rows, dim)} tensor, got "
                             f"{t.dtype} {tuple(t.shape)}")
    if not rows or out.data_ptr() == x.data_ptr():
        raise ValueError("x must hold at least one row, and out must not be x")
    return rows


class PreparedDecodeModel:
    """A decoder's cached decoding step through all its blocks as one native call
    (``step_cpu.c: model_step``): each :class:`PreparedDecodeBlock` in turn, then optionally
    the final LayerNorm and the output layer. The same results as calling the blocks one by
    one, without the Python argument handling of a call per block.

    Args:
        blocks: the blocks' :class:`PreparedDecodeBlock`, in order, all of the same width.
        norm: ``(weight, bias, eps)`` of the final LayerNorm (weight/bias ``(dim,)`` or None),
            or None for no logits.
        head: ``(weight (vocab, dim), bias (vocab,) or None)`` of the output layer, with
            ``norm``; contiguous fp32 CPU.
    """

    def __init__(self, blocks, *, norm=None, head=None) -> None:
        blocks = tuple(blocks)
        if not blocks or not all(isinstance(b, PreparedDecodeBlock) for b in blocks):
            raise TypeError("blocks must be a non-empty sequence of PreparedDecodeBlock")
        dim = blocks[0].dim
        if any(b.dim != dim for b in blocks):
            raise ValueError(f"every block must have width {dim}, got "
                             f"{[b.dim for b in blocks]}")
        if (norm is None) != (head is None):
            raise ValueError("norm and head go together (both for logits, or neither)")
        self.blocks, self.dim, self.vocab = blocks, dim, 0
        slots = len(blocks[0]._ptrs)
        self._lptr = (ctypes.c_int64 * (slots * len(blocks)))()
        for i, b in enumerate(blocks):
            self._lptr[i * slots:(i + 1) * slots] = list(b._ptrs)
        self._scales = (ctypes.c_double * len(blocks))(
            *(1.0 / math.sqrt(b.head_dim) for b in blocks))
        self._head = [0, 0, 0, 0, 0]  # head_w, head_b, norm_w, norm_b, &eps
        if head is not None:
            hw, hb = head
            nw, nb, eps = norm
            _check_gemv(torch.empty(1, dim), (hw,), (hb,), None, (nw, nb, eps), None)
            if not hw.is_contiguous():
                raise ValueError("the head weight must be contiguous")
            self._keep = [t.contiguous() if isinstance(t, Tensor) else t for t in (hw, hb, nw, nb)]
            self._storages = _storages(self._keep)
            back_with_huge_pages(self._keep[:1])
            self._eps = ctypes.c_double(float(eps))
            self.vocab = hw.shape[0]
            self._head = [0 if t is None else t.data_ptr() for t in self._keep]
            self._head.append(ctypes.addressof(self._eps))

    def __call__(self, x: Tensor, out: Tensor, caches, ropes, logits: Tensor | None = None
                 ) -> Tensor:
        """``x (R, dim)``: the embedded new token of each of ``R`` sequences; ``caches``: per
        block ``(k_cache, v_cache, pos)`` as :class:`PreparedDecodeBlock` takes them (row
        ``pos`` written); ``ropes``: per block its ``(cos, signed_sin)`` rows or None. Writes
        the last block's output to ``out (R, dim)`` (not ``x``) and returns it; with ``norm``
        and ``head`` bound, also the logits to ``logits (R, vocab)``."""
        rows = self._check_call(x, out, caches, ropes, logits)
        ptrs = type(self._lptr).from_buffer_copy(self._lptr)  # concurrent calls stay apart
        slots = len(ptrs) // len(self.blocks)
        geo = []
        for i, (block, (k_cache, v_cache, pos), rope) in enumerate(zip(self.blocks, caches,
                                                                       ropes)):
            geo += block._bind(ptrs, i * slots, rows, k_cache, v_cache, pos, rope)
        geo = _i64s(*geo)
        _model_step(self._call_slots(x, out, ptrs, geo, logits), _i64s(*self._model_geo(rows)))
        return out

    def _check_call(self, x: Tensor, out: Tensor, caches, ropes, logits: Tensor | None) -> int:
        """Check a call's rows, per-block entries and logits; returns the rows ``R``."""
        rows = _check_rows(x, out, self.dim)
        n = len(self.blocks)
        if len(caches) != n or len(ropes) != n:
            raise ValueError(f"caches and ropes must hold one entry per block ({n}), got "
                             f"{len(caches)} and {len(ropes)}")
        if self.vocab:
            if (not isinstance(logits, Tensor) or logits.shape != (rows, self.vocab)
                    or not logits.is_contiguous() or logits.dtype != torch.float32
                    or not logits.is_cpu):
                raise ValueError(f"logits must be a contiguous fp32 CPU {(rows, self.vocab)} "
                                 f"tensor")
        elif logits is not None:
            raise ValueError("logits need norm and head bound")
        return rows

    def _call_slots(self, x: Tensor, out: Tensor, ptrs, geo, logits: Tensor | None,
                    tokens: tuple[Tensor, Tensor, Tensor | None] | None = None):
        ids, embed, next_ids = (None, None, None) if tokens is None else tokens
        return _i64s(x.data_ptr(), out.data_ptr(), ctypes.addressof(ptrs), ctypes.addressof(geo),
                     ctypes.addressof(self._scales),
                     0 if logits is None else logits.data_ptr(), *self._head,
                     *(0 if t is None else t.data_ptr() for t in (ids, embed, next_ids)))

    def _model_geo(self, rows: int, embed_rows: int = 0) -> tuple[int, ...]:
        return (len(self.blocks), rows, self.dim, self.vocab, embed_rows)

    def bind(self, x: Tensor, out: Tensor, caches, tables, logits: Tensor | None = None, *,
             ids: Tensor | None = None, embed: Tensor | None = None,
             next_ids: Tensor | None = None) -> BoundDecodeStep:
        """Bind everything of a run of steps but the position, for decoding loops where Python
        time per step counts: ``x (R, dim)`` (the caller writes each step's embedded tokens
        there), ``out``, ``logits`` as for a call; ``caches``: per block ``(k_cache,
        v_cache)`` buffers ``(R, num_kv_heads, capacity, head_dim)``; ``tables``: per block its
        rotary ``(cos, signed_sin)`` tables ``(n, head_dim)`` (row ``p`` for position ``p``),
        or None without rotary. With ``ids`` (R,) int64 and ``embed`` (n, dim) fp32, the step
        itself copies row ``ids[r]`` of ``embed`` to ``x`` (the caller writes the token ids;
        an id outside ``[0, n)`` raises ``ValueError``); with ``next_ids`` (R,) int64 (and
        logits), it writes each row's greedy token (``logits.argmax(-1)``) there. All are
        checked here and must stay alive and in place while the returned step is used. Every
        block then writes and attends at the same position.
        """
        rows = self._check_call(x, out, caches, tables, logits)
        tokens = self._check_tokens(rows, ids, embed, next_ids)
        ptrs = type(self._lptr).from_buffer_copy(self._lptr)
        slots = len(ptrs) // len(self.blocks)
        geo, rope_slots, limit = [], [], None
        for i, (block, (k_cache, v_cache), table) in enumerate(zip(self.blocks, caches, tables)):
            at = i * slots
            cap = block._bind_caches(ptrs, at, rows, k_cache, v_cache)
            reach = cap
            if block.rotary:
                block._check_rope(table, None)
                reach = min(cap, table[0].shape[0])
                rope_slots.append((at + _BP_COS, table[0].data_ptr(), table[1].data_ptr(),
                                   4 * block.head_dim))
            limit = reach if limit is None else min(limit, reach)
            geo += block._geo(rows, cap, 0)
        geo = _i64s(*geo)
        keep = (x, out, logits, caches, tables, tokens, _storages([embed]))
        return BoundDecodeStep(self._call_slots(x, out, ptrs, geo, logits, tokens),
                               _i64s(*self._model_geo(rows, 0 if embed is None else len(embed))),
                               ptrs, geo, rope_slots, limit, keep)

    def _check_tokens(self, rows: int, ids: Tensor | None, embed: Tensor | None,
                      next_ids: Tensor | None) -> tuple | None:
        """Check :meth:`bind`'s token buffers; ``(ids, embed, next_ids)`` or None."""
        if (ids is None) != (embed is None):
            raise ValueError("ids and embed go together (the step embeds the ids itself)")
        if next_ids is not None and not self.vocab:
            raise ValueError("next_ids needs logits (norm and head bound)")
        for name, t in (("ids", ids), ("next_ids", next_ids)):
            if t is not None and (not isinstance(t, Tensor) or t.shape != (rows,)
                                  or not t.is_contiguous() or t.dtype != torch.int64
                                  or not t.is_cpu):
                raise ValueError(f"{name} must be a contiguous int64 CPU ({rows},) tensor")
        if embed is not None and (not isinstance(embed, Tensor) or embed.dim() != 2
                                  or embed.shape[1] != self.dim or not embed.is_contiguous()
                                  or embed.dtype != torch.float32 or not embed.is_cpu):
            raise ValueError(f"embed must be a contiguous fp32 CPU (n, {self.dim}) tensor")
        return None if ids is None and next_ids is None else (ids, embed, next_ids)


def _model_step(call, geo) -> None:
    """One ``step_cpu.c: model_step`` call on argument arrays already checked."""
    fns = _step_state["fn"]
    rc = fns["model_step"](call, geo, 0.0, torch.get_num_threads(), fns["rt"])
    if rc == -2:
        raise ValueError(f"a token id is outside [0, {geo[_MS_EMBED_ROWS]}) (the embedding's "
                         "rows)")
    if rc != 0:
        raise MemoryError("attnkit decoder step: out of memory for its buffers")


class BoundDecodeStep:
    """A :class:`PreparedDecodeModel` step with its buffers bound (from
    :meth:`PreparedDecodeModel.bind`): a call ``step(pos)`` runs every block at position
    ``pos`` and the output layer, reading the rows the caller wrote to the bound ``x``. Only
    the position changes between calls (its geometry slot and the rotary rows' addresses), so
    a call costs a few microseconds of Python. Not for concurrent calls (one decoding loop
    owns it)."""

    def __init__(self, call, model_geo, ptrs, geo, rope_slots, limit: int, keep) -> None:
        self._call, self._model_geo, self._ptrs, self._geo = call, model_geo, ptrs, geo
        self._rope_slots, self.limit, self._keep = rope_slots, limit, keep
        self._pos_slots = range(_BS_POS, len(geo), _BS_NGEO)

    def __call__(self, pos: int) -> None:
        if type(pos) is not int or not 0 <= pos < self.limit:
            raise ValueError(f"pos must be an int in [0, {self.limit}) (the caches' capacity "
                             f"and rotary tables), got {pos!r}")
        geo, ptrs = self._geo, self._ptrs
        for at in self._pos_slots:
            geo[at] = pos
        for at, cos, sin, row in self._rope_slots:
            ptrs[at], ptrs[at + 1] = cos + pos * row, sin + pos * row
        _model_step(self._call, self._model_geo)


# ------------------------------------------------------------- many short sequences

_short_state: dict = {}
_SHORT_SOURCE = Path(__file__).with_name("short_cpu.c")
_SHORT_DTYPES = {torch.float32: "f32", torch.float64: "f64"}


def _load_short():
    lib = ctypes.CDLL(str(_build(_SHORT_SOURCE)))
    fns = {(kind, suffix): _entry(lib, f"short_{kind}_{suffix}")
           for suffix in _SHORT_DTYPES.values() for kind in ("forward", "backward")}
    _register(lib)
    return fns, (ctypes.c_void_p * 4)(_openmp())  # torch's OpenMP team; no BLAS needed


def _short_self_check() -> None:
    """Forward and gradients of odd sizes (GQA 2:1, padded rows, columns and channels) against
    fp64 autograd through a plain softmax, in both precisions, with tolerances derived from
    each result's magnitude (:func:`_tolerance`)."""
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        q = torch.randn(3, 4, 7, 5, generator=gen, dtype=dtype)
        k = torch.randn(3, 2, 9, 5, generator=gen, dtype=dtype)
        v = torch.randn(3, 2, 9, 11, generator=gen, dtype=dtype)
        dout = torch.randn(3, 4, 7, 11, generator=gen, dtype=dtype)
        out, lse = _short_forward_call(q, k, v, 0.7)
        dq, dk, dv = _short_backward_call(q, k, v, dout, lse, 0.7)
        leaves = [t.double().requires_grad_() for t in (q, k, v)]
        with torch.enable_grad():  # the first call may come from inside an autograd Function
            s, ref = _softmax_reference(*leaves)
            grads = torch.autograd.grad(ref, leaves, dout.double())
        smax = float(s.detach().abs().max())
        tol = _tolerance(torch.finfo(dtype).eps, q.shape[-1], smax, k.shape[-2], 1.0)
        for name, got, want in (("output", out, ref), ("log-sum-exp", lse, torch.logsumexp(s, -1)),
                                ("dq", dq, grads[0]), ("dk", dk, grads[1]), ("dv", dv, grads[2])):
            want = want.detach()
            _compare(f"short-sequence {name} ({dtype})", got, want,
                     4 * tol * float(want.abs().max()))


def _softmax_reference(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    s = 0.7 * q @ k.repeat_interleave(2, 1).transpose(-1, -2)
    return s, torch.softmax(s, -1) @ v.repeat_interleave(2, 1)


def short_available() -> bool:
    """Whether the short-sequence kernels are built, loaded and checked (built on first call)."""
    return _available(_short_state, _load_short, _short_self_check,
                      "native short-sequence attention kernel")


def _batch_offsets(t: Tensor, nbatch: int) -> Tensor:
    """Element offset of each batch index of ``t``'s first ``nbatch`` dims, row-major."""
    off = torch.zeros((), dtype=torch.int64)
    for size, stride in zip(t.shape[:nbatch], t.stride()[:nbatch]):
        off = off.unsqueeze(-1) + torch.arange(size, dtype=torch.int64) * stride
    return off.reshape(-1)


def empty_in_layout(t: Tensor, last: int) -> Tensor:
    """An uninitialized tensor of shape ``(*t.shape[:-1], last)`` whose memory orders the
    leading dims as ``t``'s strides do (e.g. a ``(n, H, L, d)`` view of a packed ``(n, L, 3, H,
    d)`` projection gives an ``(n, L, H, last)`` buffer seen as ``(n, H, L, last)``)."""
    lead = range(t.dim() - 1)
    order = sorted(lead, key=lambda i: (-t.stride(i) if t.shape[i] > 1 else 0, i))
    buf = t.new_empty([t.shape[i] for i in order] + [last])
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return buf.permute(*inverse, len(order))


def _stacked_view(tensors: tuple[Tensor, ...]) -> tuple[int, int] | None:
    """``(offset, span)`` when ``tensors`` are equal-shaped, equally strided views of one
    storage, evenly spaced, whose stack along a new dim (the spacing as its stride) does not
    overlap itself (e.g. q, k, v unbound from a packed ``(..., 3, H, d)`` projection); else None.
    """
    first = tensors[0]
    offsets = [t.storage_offset() for t in tensors]
    if len(tensors) < 2 or any(
            t.shape != first.shape or t.stride() != first.stride() or t.dtype != first.dtype
            or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
            for t in tensors):
        return None
    step = offsets[1] - offsets[0]
    if step <= 0 or any(b - a != step for a, b in zip(offsets, offsets[1:])):
        return None
    dims = sorted([(st, n) for st, n in zip(first.stride(), first.shape) if n > 1]
                  + [(step, len(tensors))])
    extent = 1  # elements spanned by the dims of smaller stride; each stride must clear it
    for st, n in dims:
        if st < extent:
            return None
        extent += (n - 1) * st
    return offsets[0], extent


def empty_grads_like(*tensors: Tensor) -> list[Tensor]:
    """Uninitialized tensors shaped like ``tensors``, each laid out like its input; when the
    inputs are evenly spaced views of one buffer (a packed q/k/v projection), the results are
    views of one new buffer at the same relative offsets, so the packed gradient needs no
    stacking copy (see :func:`attnkit.nn.axial.unbind_packed`)."""
    stacked = _stacked_view(tensors)
    if stacked is None:
        return [empty_in_layout(t, t.shape[-1]) for t in tensors]
    start, span = stacked
    buf = tensors[0].new_empty(span)
    return [buf.as_strided(t.shape, t.stride(), t.storage_offset() - start) for t in tensors]


def _channels_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _short_call(kind: str, strided: list[Tensor], lse: Tensor, nbatch: int, geo: list[int],
                scale: float) -> None:
    """Run a kernel on ``strided`` tensors ``(*batch, H, L, C)`` (channels contiguous) and the
    contiguous ``lse (*batch, Hq, Lq)``, in the order the C function takes them."""
    fns, rt = _short_state["fn"]
    fn = fns[kind, _SHORT_DTYPES[lse.dtype]]
    assert all(t.shape[-1] <= 1 or t.stride(-1) == 1 for t in strided) and lse.is_contiguous()
    strides = [s for t in strided for s in (_stride(t, -3), _stride(t, -2))]
    geometry = torch.tensor(geo + strides, dtype=torch.int64)
    offsets = torch.cat([_batch_offsets(t, nbatch) for t in strided])
    ptrs = torch.tensor([t.data_ptr() for t in (*strided, lse)] + [offsets.data_ptr()],
                        dtype=torch.int64)
    rc = fn(ptrs.data_ptr(), geometry.data_ptr(), float(scale), torch.get_num_threads(), rt)
    if rc != 0:
        raise MemoryError(f"attnkit short-sequence kernel ({kind}): out of memory")


def _geometry(q: Tensor, k: Tensor, v: Tensor) -> list[int]:
    *batch, hq, lq, d = q.shape
    return [math.prod(batch), hq, k.shape[-3], lq, k.shape[-2], d, v.shape[-1]]


def _short_forward_call(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    q, k, v = (_channels_contiguous(t) for t in (q, k, v))
    out = empty_in_layout(q, v.shape[-1])
    lse = q.new_empty(q.shape[:-1])
    _short_call("forward", [q, k, v, out], lse, q.dim() - 3, _geometry(q, k, v), scale)
    return out, lse


def _short_backward_call(q: Tensor, k: Tensor, v: Tensor, dout: Tensor, lse: Tensor,
                         scale: float) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v, dout = (_channels_contiguous(t) for t in (q, k, v, dout))
    dq, dk, dv = empty_grads_like(q, k, v)
    _short_call("backward", [q, k, v, dout, dq, dk, dv], lse.contiguous(), q.dim() - 3,
                _geometry(q, k, v), scale)
    return dq, dk, dv


def short_forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Dense attention of every query to every key of its sequence, for many short sequences.

    Args:
        q: ``(*batch, Hq, Lq, D)``; k: ``(*batch, Hkv, Lk, D)``; v: ``(*batch, Hkv, Lk, Dv)``;
            fp32 or fp64 CPU, any strides (channels contiguous, else copied): views of a packed
            projection are read in place. ``Hq % Hkv == 0``. Scores are ``scale * q.k``.
    Returns:
        ``out (*batch, Hq, Lq, Dv)`` in ``q``'s memory order and ``lse (*batch, Hq, Lq)``.
        Not differentiable by itself (see :func:`attnkit.kernels.short.short_attention`).
    """
    if not short_available():
        raise RuntimeError("the short-sequence kernel is not available here (see "
                           "short_available)")
    scale = _check_short(q, k, v, scale)
    if q.shape[:-3].numel() == 0:
        return q.new_empty(*q.shape[:-1], v.shape[-1]), q.new_empty(q.shape[:-1])
    return _short_forward_call(q, k, v, scale)


def short_backward(q: Tensor, k: Tensor, v: Tensor, dout: Tensor, lse: Tensor,
                   scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`short_forward`'s ``out`` for ``dout`` (same shape): ``(dq, dk, dv)``,
    each in its input's memory order. ``lse`` is the forward's; the probabilities are
    recomputed from it (nothing ``L x L`` is kept between the passes)."""
    if not short_available():
        raise RuntimeError("the short-sequence kernel is not available here (see "
                           "short_available)")
    scale = _check_short(q, k, v, scale)
    want = (*q.shape[:-1], v.shape[-1])
    for t, name, shape in ((dout, "dout", want), (lse, "lse", q.shape[:-1])):
        _need(t, name, len(shape), (q.dtype,))
        if t.shape != shape:
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if q.shape[:-3].numel() == 0:
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
    return _short_backward_call(q, k, v, dout, lse, scale)


def _check_short(q: Tensor, k: Tensor, v: Tensor, scale: float) -> float:
    """Shapes, dtypes and devices :func:`short_forward` / :func:`short_backward` can read:
    ``q (*batch, Hq, Lq, D)``, ``k (*batch, Hkv, Lk, D)``, ``v (*batch, Hkv, Lk, Dv)`` with the
    same batch dims, ``Hq % Hkv == 0`` and every other size >= 1. Returns ``float(scale)``."""
    if not isinstance(q, Tensor) or q.dim() < 3:
        raise ValueError("q must be a (*batch, Hq, Lq, D) tensor")
    dtypes = tuple(_SHORT_DTYPES)
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        _need(t, name, q.dim(), (q.dtype,) if q.dtype in dtypes else dtypes)
    *batch, hq, lq, d = q.shape
    hkv, lk = k.shape[-3], k.shape[-2]
    if (k.shape[:-3] != q.shape[:-3] or v.shape[:-3] != q.shape[:-3] or k.shape[-1] != d
            or v.shape[-3:-1] != k.shape[-3:-1]):
        raise ValueError(f"need q (*batch, Hq, Lq, D), k (*batch, Hkv, Lk, D), v (*batch, Hkv, "
                         f"Lk, Dv) with equal batch dims; got q {tuple(q.shape)}, k "
                         f"{tuple(k.shape)}, v {tuple(v.shape)}")
    if min(hq, lq, d, hkv, lk, v.shape[-1]) < 1 or hq % hkv:
        raise ValueError(f"need every head, length and channel size >= 1 and Hq % Hkv == 0; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale

"""Optional compiled CPU kernels: the fused band (sliding-window) attention forward, dense
attention over many short sequences (forward and backward), and the matrix-vector products of a
decoding step.

The engine's band kernel in plain PyTorch makes separate passes over each block's score matrix
(the score GEMM with a mask added, the softmax, the output GEMM). ``band_cpu.c`` fuses them per
block of query rows: one GEMM (the ``sgemm`` of torch's own BLAS), a softmax over each row's
contiguous key range in place, one GEMM. It is compiled with the system C compiler the first time
it is needed (about a second), into a cache directory keyed by the source, the flags and the CPU,
and loaded with :mod:`ctypes` (which releases the GIL during the call).

Without a C compiler, without an ``sgemm`` in torch's library, on a failed self-check, or with
``ATTNKIT_NATIVE=0`` in the environment, :func:`band_available` is ``False`` and the engine uses
its PyTorch kernels (the same results). Only contiguous fp32 CPU tensors take this path; backward
recomputes through the PyTorch kernel (see ``structured._NativeBand``).

``short_cpu.c`` (:func:`short_forward` / :func:`short_backward`) is dense attention over many
short sequences (axial lines, patches), forward and backward, in fp32 and fp64, reading q/k/v
through arbitrary strides and batch offsets (see :mod:`.short`). Same fallbacks
(:func:`short_available`).

``gemv_cpu.c`` (:func:`gemv_rows`) multiplies a few rows by a weight matrix with every thread
streaming its own block of the weight's rows (a BLAS gemv reads it on one thread): decoding one
token is bound by reading the weights, so this is what sets its speed. Same fallbacks
(:func:`gemv_available`); no autograd (inference only).
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["band_available", "band_forward", "BAND_MAX_WIDTH", "decode_forward",
           "empty_grads_like", "empty_in_layout", "gemv_available", "gemv_multi", "gemv_rows",
           "short_available", "short_backward", "short_forward"]

_SOURCE = Path(__file__).with_name("band_cpu.c")
_GEMV_SOURCE = Path(__file__).with_name("gemv_cpu.c")
_FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-std=gnu99"]
_LIBS = ["-lm", "-lpthread"]
#: Widest band (``hi - lo + 1`` keys) the fused kernel takes; its per-thread score buffer is
#: ``block x (block + width)`` floats. Wider bands use the PyTorch kernel, which chunks.
BAND_MAX_WIDTH = 8192
#: Query rows per block of the fused kernel (one GEMM pair per block and head).
BLOCK = 64

_state: dict = {}


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
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    src = source.read_bytes()
    key = hashlib.sha256(src + repr((_FLAGS, _LIBS, cc, _cpu_key())).encode()).hexdigest()[:16]
    out = _cache_dir() / f"{source.stem}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target, then rename: processes building at once (DDP ranks) never load
    # a half-written library
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *_FLAGS, "-o", tmp, str(source), *_LIBS],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed on {source.name}: {proc.stderr.strip()[:500]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _torch_symbol(name: str) -> int | None:
    lib_dir = Path(torch.__file__).with_name("lib")
    for cand in sorted(lib_dir.glob("libtorch_cpu*")):
        try:
            return ctypes.cast(getattr(ctypes.CDLL(str(cand)), name), ctypes.c_void_p).value
        except (OSError, AttributeError):
            continue
    return None


def _load():
    lib = ctypes.CDLL(str(_build()))
    fn = lib.band_forward
    i64 = ctypes.c_int64
    fn.argtypes = [ctypes.c_void_p] * 5 + [i64] * 18 + [ctypes.c_int] + [ctypes.c_void_p] * 4
    fn.restype = ctypes.c_int
    gemm = _torch_symbol("sgemm_")  # Fortran BLAS interface (32-bit ints), MKL or OpenBLAS
    if gemm is None:
        raise RuntimeError("torch's library exports no sgemm_")
    one_thread = _torch_symbol("MKL_Set_Num_Threads_Local")  # MKL only; optional
    dec = lib.decode_forward
    dec.argtypes = [ctypes.c_void_p] * 5 + [i64] * 8 + [ctypes.c_float, ctypes.c_int] + \
        [ctypes.c_void_p] * 4
    dec.restype = ctypes.c_int
    return fn, gemm, one_thread, *_openmp(), dec


def _openmp() -> tuple[int | None, int | None]:
    """``GOMP_parallel`` and ``omp_get_thread_num`` of the OpenMP runtime torch loaded (found
    in this process's memory map), so the kernel runs on torch's own thread team: separate
    threads would compete for the cores with torch's idle workers, which spin for a while after
    each parallel op. ``(None, None)``: the kernel starts POSIX threads instead."""
    torch.ones(64, 64).sum()  # make sure torch's OpenMP runtime is loaded and initialized
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None, None
    paths = {line.split()[-1] for line in maps if "omp" in line.rsplit("/", 1)[-1]
             and line.split()[-1].startswith("/")}
    # torch's own bundled runtime first, should another OpenMP runtime be loaded too
    torch_dir = str(Path(torch.__file__).parent)
    for path in sorted(paths, key=lambda p: (not p.startswith(torch_dir), p)):
        try:
            lib = ctypes.CDLL(path)
            par, num = lib.GOMP_parallel, lib.omp_get_thread_num
        except (OSError, AttributeError):
            continue
        return (ctypes.cast(par, ctypes.c_void_p).value, ctypes.cast(num, ctypes.c_void_p).value)
    return None, None


def _self_check() -> None:
    """A small band against a dense masked reference, so a BLAS with other integer widths or a
    miscompiled kernel disables the path instead of giving wrong answers."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 37, 8, generator=g), torch.randn(1, 1, 37, 8, generator=g)
    v = torch.randn(1, 1, 37, 5, generator=g)
    out, lse = _call(q, k, v, -4, 2, 0, 37, block=16)
    i = torch.arange(37)
    rel = i.view(1, -1) - i.view(-1, 1)
    s = (q @ k.transpose(-1, -2)).masked_fill(~((rel >= -4) & (rel <= 2)), float("-inf"))
    ref = torch.softmax(s, -1) @ v
    if not (torch.allclose(out, ref, atol=1e-5) and
            torch.allclose(lse, torch.logsumexp(s, -1), atol=1e-5)):
        raise RuntimeError("self-check against a dense reference failed")
    # the decoding kernel: 3 rows per head, 2 key/value heads, keys split in 3 chunks
    q, k = torch.randn(2, 3, 8, generator=g), torch.randn(2, 41, 8, generator=g)
    v = torch.randn(2, 41, 5, generator=g)
    out, lse = _decode_call(q, k, v, nsplit=3, scale=0.5, ks=k.stride(0), vs=v.stride(0))
    s = 0.5 * (q @ k.transpose(-1, -2))
    if not (torch.allclose(out, torch.softmax(s, -1) @ v, atol=1e-5) and
            torch.allclose(lse, torch.logsumexp(s, -1), atol=1e-5)):
        raise RuntimeError("decoding self-check against a dense reference failed")


def _native_disabled() -> bool:
    return os.environ.get("ATTNKIT_NATIVE", "1").strip().lower() in ("0", "false", "no", "off")


def _available(state: dict, load, self_check, what: str) -> bool:
    """Build, load and check a kernel once; any failure means: use the PyTorch path."""
    if "ok" not in state:
        state["ok"] = False
        if _native_disabled():
            return False
        try:
            state["fn"] = load()
            self_check()
            state["ok"] = True
        except Exception as e:  # noqa: BLE001 - any failure means: use the PyTorch kernels
            state.pop("fn", None)
            warnings.warn(f"attnkit: {what} unavailable ({e}); using PyTorch instead",
                          RuntimeWarning, stacklevel=3)
    return state["ok"]


def band_available() -> bool:
    """Whether the fused band kernel is built, loaded and checked (built on the first call)."""
    return _available(_state, _load, _self_check, "fused CPU band kernel")


def _call(q: Tensor, k: Tensor, v: Tensor, lo: int, hi: int, q0: int, q1: int,
          block: int = BLOCK) -> tuple[Tensor, Tensor]:
    fn, gemm, one_thread, omp_parallel, omp_thread_num, _ = _state["fn"]
    B, hq, lq, d = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    out = q.new_empty(B, hq, q1 - q0, dv)
    lse = q.new_empty(B, hq, q1 - q0)
    rc = fn(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(),
            B, hq, hkv, lq, lk, d, dv, lo, hi, q0, q1, block, q.stride(0), q.stride(1),
            k.stride(0), k.stride(1), v.stride(0), v.stride(1), torch.get_num_threads(),
            gemm, one_thread, omp_parallel, omp_thread_num)
    if rc != 0:
        raise MemoryError("attnkit fused band kernel: out of memory for its score buffers")
    return out, lse


def band_forward(qs: Tensor, k: Tensor, v: Tensor, lo: int, hi: int, q0: int,
                 q1: int) -> tuple[Tensor, Tensor]:
    """Band attention of query rows ``[q0, q1)``: key ``j`` is allowed for query ``i`` iff
    ``lo <= j - i - (Lk - Lq) <= hi``.

    Args:
        qs: pre-scaled queries ``(B, Hkv, G, Lq, D)`` (grouped-query layout), fp32, CPU.
        k: ``(B, Hkv, Lk, D)``; v: ``(B, Hkv, Lk, Dv)``.
    Returns:
        ``out (B, Hkv, G, q1 - q0, Dv)`` and ``lse (B, Hkv, G, q1 - q0)`` (``-inf`` and zeros
        for rows without keys). Not differentiable by itself.
    """
    if not band_available():
        raise RuntimeError("the fused band kernel is not available here (see band_available)")
    B, hkv, g, lq, d = qs.shape
    # rows must be contiguous; batch and head strides are passed, so a chunk's slices of
    # longer tensors are read in place instead of copied
    q = _rows_contiguous(qs.detach().reshape(B, hkv * g, lq, d))
    out, lse = _call(q, _rows_contiguous(k.detach()), _rows_contiguous(v.detach()), lo, hi, q0,
                     q1)
    return (out.view(B, hkv, g, q1 - q0, v.shape[3]), lse.view(B, hkv, g, q1 - q0))


def _rows_contiguous(t: Tensor) -> Tensor:
    """``t (B, H, L, D)`` itself if each row of ``D`` is contiguous and rows follow each other
    within a head, else a contiguous copy."""
    if t.stride(-1) == 1 and (t.stride(-2) == t.shape[-1] or t.shape[-2] <= 1):
        return t
    return t.contiguous()


#: Keys per chunk below which :func:`decode_forward` stops splitting a head's keys further.
DECODE_MIN_CHUNK = 256


def _decode_call(q: Tensor, k: Tensor, v: Tensor, nsplit: int, scale: float, ks: int,
                 vs: int) -> tuple[Tensor, Tensor]:
    """q ``(BH, M, d)`` contiguous; head ``i``'s keys/values start ``i * ks`` / ``i * vs``
    elements into ``k`` / ``v``, rows contiguous."""
    _, gemm, one_thread, omp_parallel, omp_thread_num, fn = _state["fn"]
    bh, m, d = q.shape
    lk, dv = k.shape[-2], v.shape[-1]
    out = q.new_empty(bh, m, dv)
    lse = q.new_empty(bh, m)
    rc = fn(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(),
            bh, m, lk, d, dv, ks, vs, nsplit, scale, torch.get_num_threads(),
            gemm, one_thread, omp_parallel, omp_thread_num)
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
        k: ``(B, Hkv, Lk, D)``; v: ``(B, Hkv, Lk, Dv)``, each key/value row contiguous (a view
            into a longer preallocated cache is fine).
    Returns:
        ``out (B, Hkv, R, Dv)`` and ``lse (B, Hkv, R)``. Not differentiable.
    """
    if not band_available():
        raise RuntimeError("the native kernels are not available here (see band_available)")
    B, hkv, rows, d = q.shape
    q = q.reshape(B * hkv, rows, d)
    if not q.is_contiguous():
        q = q.contiguous()

    def heads_ok(t: Tensor) -> Tensor:
        # each head's rows contiguous and the B * Hkv heads evenly spaced (the kernel takes one
        # stride between heads); a view into a longer cache is fine
        t = _rows_contiguous(t)
        return t.contiguous() if B > 1 and t.stride(0) != hkv * t.stride(1) else t

    k, v = heads_ok(k), heads_ok(v)
    # enough chunks for every thread, none shorter than DECODE_MIN_CHUNK keys
    lk = k.shape[2]
    threads = torch.get_num_threads()
    nsplit = max(1, min(-(-threads // (B * hkv)), lk // DECODE_MIN_CHUNK))
    out, lse = _decode_call(q, k, v, nsplit, float(scale), k.stride(1), v.stride(1))
    return out.view(B, hkv, rows, v.shape[-1]), lse.view(B, hkv, rows)


# ------------------------------------------------------------------------ decoding GEMV

_gemv_state: dict = {}
#: Most rows :func:`gemv_rows` takes (a decoding step's tokens x batch); more rows are a GEMM.
GEMV_MAX_ROWS = 4


def _load_gemv():
    lib = ctypes.CDLL(str(_build(_GEMV_SOURCE)))
    fn = lib.gemv_rows
    vp, i64, cint = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    fn.argtypes = [vp, vp, i64, i64, cint, vp, vp, vp, vp, vp, vp, i64, i64, i64, cint, vp,
                   cint, vp, vp, ctypes.c_double, vp, vp, i64, i64, i64, cint, vp, vp]
    fn.restype = ctypes.c_int
    return fn, *_openmp()


def _gemv_self_check() -> None:
    g = torch.Generator().manual_seed(0)
    for rows, out_f, in_f in ((1, 37, 21), (3, 64, 48)):
        x, w = torch.randn(rows, in_f, generator=g), torch.randn(out_f, in_f, generator=g)
        b = torch.randn(out_f, generator=g)
        for bias in (None, b):
            ref = torch.nn.functional.linear(x, w, bias)
            if not (torch.allclose(_gemv_call(x, (w,), (bias,), False), ref, atol=1e-4) and
                    torch.allclose(_gemv_call(x, (w,), (bias,), True),
                                   torch.nn.functional.gelu(ref), atol=1e-4)):
                raise RuntimeError("self-check against torch.nn.functional.linear failed")
        # three segments of one output row (odd sizes: a segment boundary inside a 4-row group)
        w2, w3 = torch.randn(5, in_f, generator=g), torch.randn(10, in_f, generator=g)
        ref = torch.cat([torch.nn.functional.linear(x, w, b), x @ w2.T, x @ w3.T], -1)
        if not torch.allclose(_gemv_call(x, (w, w2, w3), (b, None, None), False), ref,
                              atol=1e-4):
            raise RuntimeError("multi-segment self-check against torch.cat of linears failed")


def gemv_available() -> bool:
    """Whether the decoding GEMV kernel is built, loaded and checked (built on the first call)."""
    return _available(_gemv_state, _load_gemv, _gemv_self_check, "native GEMV kernel")


def _gemv_call(x: Tensor, weights, biases, gelu: bool, residual: Tensor | None = None,
               layer_norm=None, rope=None) -> Tensor:
    fn, omp_parallel, omp_thread_num = _gemv_state["fn"]
    n = len(weights)
    in_f = weights[0].shape[1]
    rows = x.numel() // in_f
    w = [t.data_ptr() for t in weights] + [0] * (3 - n)
    b = [0 if t is None else t.data_ptr() for t in biases] + [0] * (3 - n)
    o = [t.shape[0] for t in weights] + [0] * (3 - n)
    y = x.new_empty(rows, o[0] + o[1] + o[2])
    ln_w, ln_b, eps = (None, None, 0.0) if layer_norm is None else layer_norm
    rc = fn(x.data_ptr(), y.data_ptr(), rows, in_f, n, *w, *b, *o, int(gelu),
            0 if residual is None else residual.data_ptr(), int(layer_norm is not None),
            0 if ln_w is None else ln_w.data_ptr(), 0 if ln_b is None else ln_b.data_ptr(),
            float(eps), *_rope_args(rope), torch.get_num_threads(), omp_parallel,
            omp_thread_num)
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
        check: validate the arguments (``False``: the caller already has; a decoding step
            saves the microseconds).
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
        biases = tuple(None if b is None else b.contiguous() for b in biases)
        if residual is not None:
            residual = residual.contiguous()
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


# ------------------------------------------------------------- many short sequences

_short_state: dict = {}
_SHORT_SOURCE = Path(__file__).with_name("short_cpu.c")
_SHORT_DTYPES = {torch.float32: "f32", torch.float64: "f64"}


def _load_short():
    lib = ctypes.CDLL(str(_build(_SHORT_SOURCE)))
    fns = {}
    for suffix in _SHORT_DTYPES.values():
        for kind in ("forward", "backward"):
            fn = getattr(lib, f"short_{kind}_{suffix}")
            fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_double, ctypes.c_int] + \
                [ctypes.c_void_p] * 2
            fn.restype = ctypes.c_int
            fns[kind, suffix] = fn
    return fns, *_openmp()


def _short_self_check() -> None:
    """Forward and gradients of odd sizes (GQA 2:1, padded rows, columns and channels) against
    autograd through a plain softmax, in both precisions."""
    gen = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-10)):
        q = torch.randn(3, 4, 7, 5, generator=gen, dtype=dtype)
        k = torch.randn(3, 2, 9, 5, generator=gen, dtype=dtype)
        v = torch.randn(3, 2, 9, 11, generator=gen, dtype=dtype)
        dout = torch.randn(3, 4, 7, 11, generator=gen, dtype=dtype)
        out, lse = _short_forward_call(q, k, v, 0.7)
        dq, dk, dv = _short_backward_call(q, k, v, dout, lse, 0.7)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        with torch.enable_grad():  # the first call may come from inside an autograd Function
            s, ref = _softmax_reference(*leaves)
            grads = torch.autograd.grad(ref, leaves, dout)
        pairs = [(out, ref), (lse, torch.logsumexp(s, -1)), *zip((dq, dk, dv), grads)]
        if not all(torch.allclose(a, b.detach(), atol=tol, rtol=tol) for a, b in pairs):
            raise RuntimeError(f"self-check against autograd failed ({dtype})")


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
    fns, omp_parallel, omp_thread_num = _short_state["fn"]
    fn = fns[kind, _SHORT_DTYPES[lse.dtype]]
    strides = [s for t in strided for s in (t.stride(-3), t.stride(-2))]
    geometry = torch.tensor(geo + strides, dtype=torch.int64)
    offsets = torch.cat([_batch_offsets(t, nbatch) for t in strided])
    ptrs = torch.tensor([t.data_ptr() for t in (*strided, lse)], dtype=torch.int64)
    rc = fn(ptrs.data_ptr(), geometry.data_ptr(), offsets.data_ptr(), float(scale),
            torch.get_num_threads(), omp_parallel, omp_thread_num)
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
    return _short_forward_call(q, k, v, scale)


def short_backward(q: Tensor, k: Tensor, v: Tensor, dout: Tensor, lse: Tensor,
                   scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`short_forward`'s ``out`` for ``dout`` (same shape): ``(dq, dk, dv)``,
    each in its input's memory order. ``lse`` is the forward's; the probabilities are
    recomputed from it (nothing ``L x L`` is kept between the passes)."""
    if not short_available():
        raise RuntimeError("the short-sequence kernel is not available here (see "
                           "short_available)")
    return _short_backward_call(q, k, v, dout, lse, scale)

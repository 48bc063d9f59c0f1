// Dense attention over many short sequences (axial-attention lines, a ViT's patches), forward
// and backward, for attnkit (loaded by attnkit/kernels/native.py via ctypes).
//
// Torch's CPU SDPA runs each (sequence, head) of a 32-long line through BLAS calls sized for long
// sequences, zero-fills its gradient buffers and wants q/k/v in its own layout. Here one work
// item is one sequence, all its heads (their rows share cache lines): the operand a product
// needs transposed is gathered into a small padded buffer, and every product is a
// register-blocked 4-row micro-kernel on GCC vector types (AVX2/AVX-512VL/SSE/NEON as the
// compiler targets). Scores are kept transposed (keys x queries) so the softmax reduces down
// columns with vertical vector ops. Inputs and outputs are read and written in place through
// strides: the sequence index of each tensor is an arbitrary offset (one int64 per sequence),
// heads and rows have their own strides, and only channels must be contiguous. So a
// projection's packed (..., 3, H, d) output is read as q, k and v along any axis of a volume
// without copies.
//
// Forward writes out and the per-row log-sum-exp; backward recomputes the probabilities from
// q, k and the log-sum-exp (nothing of size L x L is stored between the passes) and uses
// D_i = sum_j P_ij dP_ij, so the forward output is not needed. Query head h reads key/value head
// h / (Hq / Hkv); a key/value head's whole group is handled within one work item, so its dk/dv
// are summed without atomics. The file is compiled twice over (float, double) by including
// itself.
#ifndef SHORT_BODY
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include "team.h"

// Vectors as wide as the target's registers: 32 bytes with AVX, else 16 (SSE, NEON); wider
// generic vectors than the hardware has are split badly by the compiler.
#if defined(__AVX__)
#define VBYTES 32
#else
#define VBYTES 16
#endif
typedef float vf32 __attribute__((vector_size(VBYTES)));
typedef int32_t vi32 __attribute__((vector_size(VBYTES)));
typedef double vf64 __attribute__((vector_size(VBYTES)));
typedef int64_t vi64 __attribute__((vector_size(VBYTES)));

// exp of VL floats x <= 0 (every softmax argument here is a logit minus its row's maximum or
// log-sum-exp): PyTorch's exp_u20 polynomial (as band_cpu.c) on r = x - n ln 2 with n = round(x
// log2 e) found by the 1.5 * 2^23 rounding trick; below -87.3 (2^n would leave the normal range)
// the result is 0. Relative error ~1e-7.
static inline vf32 expv_f32(vf32 x) {
  const vf32 lo = (vf32){0} - 87.3365447f, magic = (vf32){0} + 12582912.f;
  vi32 small = x < lo;
  x = (vf32)(((vi32)x & ~small) | ((vi32)lo & small));
  vf32 fx = x * 1.44269504f + magic;  // round(x log2 e) in the low mantissa bits
  vi32 n = (vi32)fx - (vi32)magic;
  fx -= magic;
  vf32 r = x - fx * 0.693359375f;  // ln 2 in two parts (Cody-Waite) keeps r exact
  r = r + fx * 2.12194440e-4f;
  vf32 p = r * 0.00828929059f + 0.0418978221f;
  p = p * r + 0.166676521f;
  p = p * r + 0.499991506f;
  p = p * r + 0.999999701f;
  p = p * r + 1.f;
  vf32 pow2 = (vf32)(((n + 127) << 23) & ~small);
  return p * pow2;
}

#if VBYTES == 32
// dst rows 0..7 (stride ld) = the columns of the 8 x 8 block at src (row stride ss): unpack
// pairs of rows, then pairs of pairs, then swap 128-bit halves (as _mm256 unpack/shuffle/permute).
#if defined(__clang__) || __GNUC__ >= 12
#define SHUF8(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUF8(a, b, ...) __builtin_shuffle(a, b, (vi32){__VA_ARGS__})
#endif
static inline void transpose8(float *dst, int64_t ld, const float *src, int64_t ss) {
  vf32 r[8], t[8], u[8];
  for (int i = 0; i < 8; i++) memcpy(&r[i], src + i * ss, sizeof r[i]);
  for (int i = 0; i < 8; i += 2) {
    t[i] = SHUF8(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = SHUF8(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = SHUF8(t[i], t[i + 2], 0, 1, 8, 9, 4, 5, 12, 13);
    u[i + 1] = SHUF8(t[i], t[i + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    u[i + 2] = SHUF8(t[i + 1], t[i + 3], 0, 1, 8, 9, 4, 5, 12, 13);
    u[i + 3] = SHUF8(t[i + 1], t[i + 3], 2, 3, 10, 11, 6, 7, 14, 15);
  }
  for (int i = 0; i < 4; i++) {
    vf32 a = SHUF8(u[i], u[i + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    vf32 b = SHUF8(u[i], u[i + 4], 4, 5, 6, 7, 12, 13, 14, 15);
    memcpy(dst + i * ld, &a, sizeof a);
    memcpy(dst + (i + 4) * ld, &b, sizeof b);
  }
}
#define TRANSPOSE8_F32
#endif

// exp of doubles through libm: the double kernels serve exactness checks, not speed.
static inline vf64 expv_f64(vf64 x) {
  for (int i = 0; i < VBYTES / 8; i++) x[i] = exp(x[i]);
  return x;
}

// geometry slots (see short_forward / short_backward)
enum { G_NB, G_HQ, G_HKV, G_LQ, G_LK, G_D, G_DV, G_QSH, G_QSL, G_KSH, G_KSL, G_VSH, G_VSL,
       G_OSH, G_OSL, G_DQSH, G_DQSL, G_DKSH, G_DKSL, G_DVSH, G_DVSL };

static int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

#define SHORT_BODY
#define R float
#define V vf32
#define VI vi32
#define VL (VBYTES / 4)
#define EXPV expv_f32
#define LOG logf
#define FN(name) name##_f32
#ifdef TRANSPOSE8_F32
#define TRANSPOSE8
#endif
#include "short_cpu.c"
#undef TRANSPOSE8
#undef R
#undef V
#undef VI
#undef VL
#undef EXPV
#undef LOG
#undef FN
#define R double
#define V vf64
#define VI vi64
#define VL (VBYTES / 8)
#define EXPV expv_f64
#define LOG log
#define FN(name) name##_f64
#include "short_cpu.c"

#else  // ---------------------------------------------------------------- body, per type R

static inline V FN(ld)(const R *p) { V v; memcpy(&v, p, sizeof v); return v; }
static inline void FN(st)(R *p, V v) { memcpy(p, &v, sizeof v); }

// C (M x N) = alpha diag(rs) A (M x K) B (K x N) [+ C] (rs: per-row scales, or NULL for 1).
// A's element (m, k) is A[m * sam + k * sak] (A or A^T, row-major); B and C rows are contiguous
// with strides ldb, ldc; N is a multiple of VL. Four rows times two vectors of accumulators
// stay in registers.
static void FN(mm)(const R *A, int64_t sam, int64_t sak, const R *B, int64_t ldb, R *C,
                   int64_t ldc, int64_t M, int64_t N, int64_t K, R alpha, const R *rs, int acc) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) {
    const R *a0 = A + m * sam, *a1 = a0 + sam, *a2 = a1 + sam, *a3 = a2 + sam;
    R *c0 = C + m * ldc, *c1 = c0 + ldc, *c2 = c1 + ldc, *c3 = c2 + ldc;
    int64_t n = 0;
    for (; n + 2 * VL <= N; n += 2 * VL) {
      V s00 = {0}, s01 = {0}, s10 = {0}, s11 = {0}, s20 = {0}, s21 = {0}, s30 = {0}, s31 = {0};
      for (int64_t k = 0; k < K; k++) {
        const R *b = B + k * ldb + n;
        V b0 = FN(ld)(b), b1 = FN(ld)(b + VL);
        R x0 = a0[k * sak], x1 = a1[k * sak], x2 = a2[k * sak], x3 = a3[k * sak];
        s00 += x0 * b0; s01 += x0 * b1;
        s10 += x1 * b0; s11 += x1 * b1;
        s20 += x2 * b0; s21 += x2 * b1;
        s30 += x3 * b0; s31 += x3 * b1;
      }
      // the row scales are read only here: kept live through the loop, they would push the
      // accumulators out of AVX2's 16 registers
      R r0 = rs ? alpha * rs[m] : alpha, r1 = rs ? alpha * rs[m + 1] : alpha;
      R r2 = rs ? alpha * rs[m + 2] : alpha, r3 = rs ? alpha * rs[m + 3] : alpha;
      s00 *= r0; s01 *= r0; s10 *= r1; s11 *= r1;
      s20 *= r2; s21 *= r2; s30 *= r3; s31 *= r3;
      if (acc) {
        s00 += FN(ld)(c0 + n); s01 += FN(ld)(c0 + n + VL);
        s10 += FN(ld)(c1 + n); s11 += FN(ld)(c1 + n + VL);
        s20 += FN(ld)(c2 + n); s21 += FN(ld)(c2 + n + VL);
        s30 += FN(ld)(c3 + n); s31 += FN(ld)(c3 + n + VL);
      }
      FN(st)(c0 + n, s00); FN(st)(c0 + n + VL, s01);
      FN(st)(c1 + n, s10); FN(st)(c1 + n + VL, s11);
      FN(st)(c2 + n, s20); FN(st)(c2 + n + VL, s21);
      FN(st)(c3 + n, s30); FN(st)(c3 + n + VL, s31);
    }
    for (; n < N; n += VL) {
      V s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
      for (int64_t k = 0; k < K; k++) {
        V b0 = FN(ld)(B + k * ldb + n);
        s0 += a0[k * sak] * b0; s1 += a1[k * sak] * b0;
        s2 += a2[k * sak] * b0; s3 += a3[k * sak] * b0;
      }
      R r0 = rs ? alpha * rs[m] : alpha, r1 = rs ? alpha * rs[m + 1] : alpha;
      R r2 = rs ? alpha * rs[m + 2] : alpha, r3 = rs ? alpha * rs[m + 3] : alpha;
      s0 *= r0; s1 *= r1; s2 *= r2; s3 *= r3;
      if (acc) {
        s0 += FN(ld)(c0 + n); s1 += FN(ld)(c1 + n);
        s2 += FN(ld)(c2 + n); s3 += FN(ld)(c3 + n);
      }
      FN(st)(c0 + n, s0); FN(st)(c1 + n, s1); FN(st)(c2 + n, s2); FN(st)(c3 + n, s3);
    }
  }
  for (; m < M; m++) {  // leftover rows, one at a time
    const R *a0 = A + m * sam;
    R *c0 = C + m * ldc;
    R r0 = rs ? alpha * rs[m] : alpha;
    for (int64_t n = 0; n < N; n += VL) {
      V s0 = {0};
      for (int64_t k = 0; k < K; k++) s0 += a0[k * sak] * FN(ld)(B + k * ldb + n);
      s0 *= r0;
      if (acc) s0 += FN(ld)(c0 + n);
      FN(st)(c0 + n, s0);
    }
  }
}

static inline V FN(sel)(VI m, V a, V b) { return (V)(((VI)a & m) | ((VI)b & ~m)); }

static inline V FN(vmax)(V a, V b) { return FN(sel)(a > b, a, b); }

// Softmax down each column of ST (Lk rows of W columns, W a multiple of VL: column i holds query
// i's logits over the keys), VL queries at a time, so every reduction is a vertical vector op
// (four partial maxima and sums break the dependency chains). Leaves exp(logit - max) in ST and
// the normalizers 1 / sum in inv (W entries; the output product applies them per row), and
// writes the log-sum-exp of columns [0, Lq) to lse; a column of -inf logits gives zeros.
static void FN(softmax_cols)(R *ST, int64_t Lk, int64_t W, R *inv, R *lse, int64_t Lq) {
  const V ninf = (V){0} - INFINITY, zero = {0};
  for (int64_t i = 0; i < W; i += VL) {
    R *c = ST + i;
    V m0 = ninf, m1 = ninf, m2 = ninf, m3 = ninf;
    int64_t j = 0;
    for (; j + 4 <= Lk; j += 4) {
      m0 = FN(vmax)(m0, FN(ld)(c + j * W));
      m1 = FN(vmax)(m1, FN(ld)(c + (j + 1) * W));
      m2 = FN(vmax)(m2, FN(ld)(c + (j + 2) * W));
      m3 = FN(vmax)(m3, FN(ld)(c + (j + 3) * W));
    }
    for (; j < Lk; j++) m0 = FN(vmax)(m0, FN(ld)(c + j * W));
    V vm = FN(vmax)(FN(vmax)(m0, m1), FN(vmax)(m2, m3));
    vm = FN(sel)(vm == ninf, zero, vm);
    V s0 = zero, s1 = zero, s2 = zero, s3 = zero;
    for (j = 0; j + 4 <= Lk; j += 4) {
      V e0 = EXPV(FN(ld)(c + j * W) - vm), e1 = EXPV(FN(ld)(c + (j + 1) * W) - vm);
      V e2 = EXPV(FN(ld)(c + (j + 2) * W) - vm), e3 = EXPV(FN(ld)(c + (j + 3) * W) - vm);
      FN(st)(c + j * W, e0); FN(st)(c + (j + 1) * W, e1);
      FN(st)(c + (j + 2) * W, e2); FN(st)(c + (j + 3) * W, e3);
      s0 += e0; s1 += e1; s2 += e2; s3 += e3;
    }
    for (; j < Lk; j++) {
      V e = EXPV(FN(ld)(c + j * W) - vm);
      FN(st)(c + j * W, e);
      s0 += e;
    }
    V vs = (s0 + s1) + (s2 + s3);
    FN(st)(inv + i, FN(sel)(vs == zero, zero, 1 / vs));
    for (int t = 0; t < VL && i + t < Lq; t++) lse[i + t] = vm[t] + LOG(vs[t]);
  }
}

// D = sum over rows j of P * dP per column (VL columns at c), four partial sums.
static inline V FN(col_dot)(const R *p, const R *q, int64_t Lk, int64_t W) {
  V s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
  int64_t j = 0;
  for (; j + 4 <= Lk; j += 4) {
    s0 += FN(ld)(p + j * W) * FN(ld)(q + j * W);
    s1 += FN(ld)(p + (j + 1) * W) * FN(ld)(q + (j + 1) * W);
    s2 += FN(ld)(p + (j + 2) * W) * FN(ld)(q + (j + 2) * W);
    s3 += FN(ld)(p + (j + 3) * W) * FN(ld)(q + (j + 3) * W);
  }
  for (; j < Lk; j++) s0 += FN(ld)(p + j * W) * FN(ld)(q + j * W);
  return (s0 + s1) + (s2 + s3);
}

// PT = exp(ST - lse[column]) in place (Lk rows of W columns); columns >= Lq and columns whose
// lse is -inf (no mass) give zeros.
static void FN(probs_cols)(R *ST, int64_t Lk, int64_t W, const R *lse, int64_t Lq) {
  for (int64_t i = 0; i < W; i += VL) {
    V l;
    for (int c = 0; c < VL; c++)
      l[c] = i + c < Lq && lse[i + c] != -INFINITY ? lse[i + c] : INFINITY;
    for (int64_t j = 0; j < Lk; j++) FN(st)(ST + j * W + i, EXPV(FN(ld)(ST + j * W + i) - l));
  }
}

typedef struct {
  const R *q, *k, *v, *dout, *lse;
  R *out, *lse_out, *dq, *dk, *dv;
  const int64_t *g;    // geometry, see short_forward / short_backward
  const int64_t *off;  // per-sequence offsets, one row of nb per tensor
  R scale;
} FN(args_t);

// rows [0, rows) of src (row stride ss, `cols` contiguous) into dst (row stride ld >= cols),
// zero-padding columns [cols, ld)
static void FN(gather_rows)(R *dst, int64_t ld, const R *src, int64_t ss, int64_t rows,
                            int64_t cols) {
  for (int64_t i = 0; i < rows; i++) {
    const R *s = src + i * ss;
    R *d = dst + i * ld;
    for (int64_t c = 0; c < cols; c++) d[c] = s[c];
    for (int64_t c = cols; c < ld; c++) d[c] = 0;
  }
}

// the transpose of rows [0, rows) of src (`cols` wide) into dst (cols x ld), columns >= rows 0;
// full 8 x 8 float blocks go through registers (three rounds of shuffles), the rest one by one
static void FN(gather_t)(R *dst, int64_t ld, const R *src, int64_t ss, int64_t rows,
                         int64_t cols) {
  for (int64_t c = 0; c < cols; c++)
    for (int64_t i = rows; i < ld; i++) dst[c * ld + i] = 0;
  int64_t rows8 = 0, cols8 = 0;
#ifdef TRANSPOSE8
  rows8 = rows / 8 * 8, cols8 = cols / 8 * 8;
  for (int64_t i = 0; i < rows8; i += 8)
    for (int64_t c = 0; c < cols8; c += 8) transpose8(dst + c * ld + i, ld, src + i * ss + c, ss);
#endif
  for (int64_t i = 0; i < rows; i++) {
    const R *s = src + i * ss;
    for (int64_t c = i < rows8 ? cols8 : 0; c < cols; c++) dst[c * ld + i] = s[c];
  }
}

static void FN(scatter_rows)(R *dst, int64_t ds, const R *src, int64_t ld, int64_t rows,
                             int64_t cols) {
  for (int64_t i = 0; i < rows; i++)
    for (int64_t c = 0; c < cols; c++) dst[i * ds + c] = src[i * ld + c];
}

// An operand read as rows of `cols` channels: in place when cols is a multiple of VL (so the
// micro-kernel's vectors never pass a row's end), else a zero-padded copy in buf.
static const R *FN(rows_operand)(const R *src, int64_t ss, int64_t rows, int64_t cols, R *buf,
                                 int64_t *ld) {
  if (cols % VL == 0) { *ld = ss; return src; }
  *ld = round_up(cols, VL);
  FN(gather_rows)(buf, *ld, src, ss, rows, cols);
  return buf;
}

// Pull a sequence's rows into the cache ahead of use: each row's span over all heads.
static void FN(prefetch_rows)(const R *p, int64_t rows, int64_t rs, int64_t span) {
  for (int64_t i = 0; i < rows; i++)
    for (int64_t c = 0; c < span; c += 64 / sizeof(R)) __builtin_prefetch(p + i * rs + c);
}

static void FN(prefetch_item)(const FN(args_t) *A, int64_t b, int with_dout) {
  const int64_t *g = A->g, nb = g[G_NB], *off = A->off;
  if (b >= nb) return;
  FN(prefetch_rows)(A->q + off[b], g[G_LQ], g[G_QSL], (g[G_HQ] - 1) * g[G_QSH] + g[G_D]);
  FN(prefetch_rows)(A->k + off[nb + b], g[G_LK], g[G_KSL], (g[G_HKV] - 1) * g[G_KSH] + g[G_D]);
  FN(prefetch_rows)(A->v + off[2 * nb + b], g[G_LK], g[G_VSL],
                    (g[G_HKV] - 1) * g[G_VSH] + g[G_DV]);
  if (with_dout)
    FN(prefetch_rows)(A->dout + off[3 * nb + b], g[G_LQ], g[G_OSL],
                      (g[G_HQ] - 1) * g[G_OSH] + g[G_DV]);
}

// Scores are kept transposed, ST (Lk x LqV): column i is query i, so the softmax reductions run
// down the columns with vertical vector ops on VL queries at once (no horizontal sums per row).
static void FN(forward_items)(team_t *TM) {
  const FN(args_t) *A = (const FN(args_t) *)TM->arg;
  const int64_t *g = A->g;
  int64_t nb = g[G_NB], Hq = g[G_HQ], Hkv = g[G_HKV], Lq = g[G_LQ], Lk = g[G_LK], d = g[G_D],
          dv = g[G_DV], grp = Hq / Hkv;
  int64_t LqV = round_up(Lq, VL), dvV = round_up(dv, VL);
  R *buf = (R *)malloc(sizeof(R) * (d * LqV + Lk * dvV + Lk * LqV + Lq * dvV + LqV));
  if (!buf) return;  // items left to the other threads (team_run reports any not done)
  R *QT = buf, *Vbuf = QT + d * LqV, *ST = Vbuf + Lk * dvV, *O = ST + Lk * LqV,
    *inv = O + Lq * dvV;
  const int64_t *qo = A->off, *ko = qo + nb, *vo = ko + nb, *oo = vo + nb;
  int out_direct = dv % VL == 0;
  int64_t start, stop;
  while (team_next(TM, &start, &stop)) {
    for (int64_t b = start; b < stop; b++) {
      FN(prefetch_item)(A, b + 1, 0);
      for (int64_t hk = 0; hk < Hkv; hk++) {
        int64_t ldv;
        const R *kp = A->k + ko[b] + hk * g[G_KSH];
        const R *Vp = FN(rows_operand)(A->v + vo[b] + hk * g[G_VSH], g[G_VSL], Lk, dv, Vbuf, &ldv);
        for (int64_t h = hk * grp; h < (hk + 1) * grp; h++) {
          FN(gather_t)(QT, LqV, A->q + qo[b] + h * g[G_QSH], g[G_QSL], Lq, d);
          FN(mm)(kp, g[G_KSL], 1, QT, LqV, ST, LqV, Lk, LqV, d, A->scale, NULL, 0);
          FN(softmax_cols)(ST, Lk, LqV, inv, A->lse_out + (b * Hq + h) * Lq, Lq);
          R *op = A->out + oo[b] + h * g[G_OSH];
          if (out_direct) {
            FN(mm)(ST, 1, LqV, Vp, ldv, op, g[G_OSL], Lq, dv, Lk, 1, inv, 0);
          } else {
            FN(mm)(ST, 1, LqV, Vp, ldv, O, dvV, Lq, dvV, Lk, 1, inv, 0);
            FN(scatter_rows)(op, g[G_OSL], O, dvV, Lq, dv);
          }
        }
      }
    }
  team_done(TM, stop - start);
  }
  free(buf);
}

static void FN(backward_items)(team_t *TM) {
  const FN(args_t) *A = (const FN(args_t) *)TM->arg;
  const int64_t *g = A->g;
  int64_t nb = g[G_NB], Hq = g[G_HQ], Hkv = g[G_HKV], Lq = g[G_LQ], Lk = g[G_LK], d = g[G_D],
          dv = g[G_DV], grp = Hq / Hkv;
  int64_t LqV = round_up(Lq, VL), dV = round_up(d, VL), dvV = round_up(dv, VL);
  R *buf = (R *)malloc(sizeof(R) * (d * LqV + dv * LqV + Lk * dV + Lq * dV + Lq * dvV +
                                    2 * Lk * LqV + Lk * dV + Lk * dvV + Lq * dV));
  if (!buf) return;  // items left to the other threads (team_run reports any not done)
  R *QT = buf, *dOT = QT + d * LqV, *Kbuf = dOT + dv * LqV, *Qbuf = Kbuf + Lk * dV,
    *dObuf = Qbuf + Lq * dV, *PT = dObuf + Lq * dvV, *dST = PT + Lk * LqV,
    *dKbuf = dST + Lk * LqV, *dVbuf = dKbuf + Lk * dV, *dQbuf = dVbuf + Lk * dvV;
  const int64_t *qo = A->off, *ko = qo + nb, *vo = ko + nb, *doo = vo + nb, *dqo = doo + nb,
                *dko = dqo + nb, *dvo = dko + nb;
  int d_direct = d % VL == 0, dv_direct = dv % VL == 0;
  int64_t start, stop;
  while (team_next(TM, &start, &stop)) {
    for (int64_t b = start; b < stop; b++) {
      FN(prefetch_item)(A, b + 1, 1);
      for (int64_t hk = 0; hk < Hkv; hk++) {
        const R *kp = A->k + ko[b] + hk * g[G_KSH], *vp = A->v + vo[b] + hk * g[G_VSH];
        int64_t ldk, ldq, lddo;
        const R *Kp = FN(rows_operand)(kp, g[G_KSL], Lk, d, Kbuf, &ldk);
        // dK, dV: written in place when the channels allow, summed over the group's heads
        R *dkp = A->dk + dko[b] + hk * g[G_DKSH], *dvp = A->dv + dvo[b] + hk * g[G_DVSH];
        R *dKt = d_direct ? dkp : dKbuf, *dVt = dv_direct ? dvp : dVbuf;
        int64_t lddk = d_direct ? g[G_DKSL] : dV, lddv = dv_direct ? g[G_DVSL] : dvV;
        for (int64_t h = hk * grp; h < (hk + 1) * grp; h++) {
          const R *qp = A->q + qo[b] + h * g[G_QSH], *dop = A->dout + doo[b] + h * g[G_OSH];
          const R *Qp = FN(rows_operand)(qp, g[G_QSL], Lq, d, Qbuf, &ldq);
          const R *dOp = FN(rows_operand)(dop, g[G_OSL], Lq, dv, dObuf, &lddo);
          FN(gather_t)(QT, LqV, qp, g[G_QSL], Lq, d);
          FN(gather_t)(dOT, LqV, dop, g[G_OSL], Lq, dv);
          FN(mm)(kp, g[G_KSL], 1, QT, LqV, PT, LqV, Lk, LqV, d, A->scale, NULL, 0);  // scores^T
          FN(probs_cols)(PT, Lk, LqV, A->lse + (b * Hq + h) * Lq, Lq);
          FN(mm)(vp, g[G_VSL], 1, dOT, LqV, dST, LqV, Lk, LqV, dv, 1, NULL, 0);  // dP^T = V dO^T
          for (int64_t i = 0; i < LqV; i += VL) {  // dS = P * (dP - rowsum(P * dP)), per column
            V D = FN(col_dot)(PT + i, dST + i, Lk, LqV);
            for (int64_t j = 0; j < Lk; j++)
              FN(st)(dST + j * LqV + i, FN(ld)(PT + j * LqV + i) * (FN(ld)(dST + j * LqV + i) - D));
          }
          int acc = h > hk * grp;
          FN(mm)(PT, LqV, 1, dOp, lddo, dVt, lddv, Lk, dv_direct ? dv : dvV, Lq, 1, NULL, acc);
          FN(mm)(dST, LqV, 1, Qp, ldq, dKt, lddk, Lk, d_direct ? d : dV, Lq, A->scale, NULL, acc);
          R *dqp = A->dq + dqo[b] + h * g[G_DQSH];
          if (d_direct) {
            FN(mm)(dST, 1, LqV, Kp, ldk, dqp, g[G_DQSL], Lq, d, Lk, A->scale, NULL, 0);
          } else {
            FN(mm)(dST, 1, LqV, Kp, ldk, dQbuf, dV, Lq, dV, Lk, A->scale, NULL, 0);
            FN(scatter_rows)(dqp, g[G_DQSL], dQbuf, dV, Lq, d);
          }
        }
        if (!d_direct) FN(scatter_rows)(dkp, g[G_DKSL], dKbuf, dV, Lk, d);
        if (!dv_direct) FN(scatter_rows)(dvp, g[G_DVSL], dVbuf, dvV, Lk, dv);
      }
    }
  team_done(TM, stop - start);
  }
  free(buf);
}

// ptr: q, k, v, out, lse (B x Hq x Lq, contiguous), off. geo: nb, Hq, Hkv, Lq, Lk, d, dv, then
// the (head, row) strides of q, k, v, out. off: nb offsets (elements) of each sequence in q, k,
// v, out. Scores are scale * q.k. One work item per sequence. Returns 0, or -1 when a buffer
// could not be allocated. (Calling convention: team.h.)
int FN(short_forward)(const int64_t *ptr, const int64_t *geo, double scale, int nthreads,
                      void *const *rt) {
  const int64_t *off = (const int64_t *)ptr[5];
  FN(args_t) A;
  memset(&A, 0, sizeof A);
  A.q = (const R *)ptr[0]; A.k = (const R *)ptr[1]; A.v = (const R *)ptr[2];
  A.out = (R *)ptr[3]; A.lse_out = (R *)ptr[4];
  A.g = geo; A.off = off; A.scale = (R)scale;
  return team_run(FN(forward_items), &A, geo[G_NB], nthreads, rt[RT_OMP_PARALLEL]);
}

// ptr: q, k, v, dout, dq, dk, dv, lse, off. geo: nb, Hq, Hkv, Lq, Lk, d, dv, then the (head,
// row) strides of q, k, v, dout, dq, dk, dv. off: nb offsets of each sequence in q, k, v, dout,
// dq, dk, dv. Every element of dq, dk, dv is written.
int FN(short_backward)(const int64_t *ptr, const int64_t *geo, double scale, int nthreads,
                       void *const *rt) {
  const int64_t *off = (const int64_t *)ptr[8];
  FN(args_t) A;
  memset(&A, 0, sizeof A);
  A.q = (const R *)ptr[0]; A.k = (const R *)ptr[1]; A.v = (const R *)ptr[2];
  A.dout = (const R *)ptr[3]; A.dq = (R *)ptr[4]; A.dk = (R *)ptr[5]; A.dv = (R *)ptr[6];
  A.lse = (const R *)ptr[7];
  A.g = geo; A.off = off; A.scale = (R)scale;
  return team_run(FN(backward_items), &A, geo[G_NB], nthreads, rt[RT_OMP_PARALLEL]);
}
#endif

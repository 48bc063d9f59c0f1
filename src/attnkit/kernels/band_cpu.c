// Fused band attention for attnkit, forward and backward, in fp32 and fp64 (loaded by
// attnkit/kernels/native.py via ctypes; calling convention in team.h). The file is compiled
// twice over (float with AVX2 exp, double with libm's exp: the double kernels serve exactness
// checks such as gradcheck) by including itself.
//
// Query i sees keys j with lo <= j - i - (Lk - L) <= hi. Inputs are fp32 or fp64 with contiguous rows
// and the given batch / head strides (slices of longer tensors are read in place): q (B, Hq, L,
// d) pre-scaled, k (B, Hkv, Lk, d), v (B, Hkv, Lk, dv); head h reads kv head h / (Hq / Hkv).
// Products are the sgemm / dgemm of torch's own BLAS (passed in), run with one thread per team member.
//
// Forward, per (batch, head, block of bq query rows): one GEMM for the scores of the block's key
// window, a softmax over each row's contiguous key range in place (AVX2 exp; other entries of
// the row zeroed), one GEMM for the output; the log-sum-exp of each row is written for merging
// and backward. Rows [q0, q1) go to out (B, Hq, q1 - q0, dv) and lse (B, Hq, q1 - q0); a row
// with no key gives zeros and -inf.
//
// Backward recomputes the probabilities from q, k and the saved log-sum-exp (nothing of size
// L x window is kept between the passes), with dS = P * (dP - rowsum(P * dP) + dlse) (dlse: the
// gradient reaching the log-sum-exp when partial results were merged). A work item is one
// (batch, kv head, segment of query rows) with all query heads of the group, so the group's
// dk / dv are summed in the item's own buffer without atomics; the item stores the keys it owns
// and leaves the few keys its band reaches beyond them (at most hi - lo) in a halo buffer that
// is added once every item is done.
//
// Weights (band_weights) recompute each block's scores with the forward's GEMM and write row
// i's probabilities exp(s - lse_i) (lse: the final log-sum-exp, which may span other
// components too) as one contiguous run at values[bh, offs[i] .. offs[i] + n_i) of a caller's
// CSR buffer (optionally the keys at indices[offs[i] ..]); every run is bounds-checked.
#ifndef BAND_BODY
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include "team.h"
#include "vecmath.h"

typedef void (*dgemm_t)(const char *, const char *, const int *, const int *, const int *,
                        const double *, const double *, const int *, const double *, const int *,
                        const double *, double *, const int *);

// geometry slots: sizes, band, row range, block size, then batch / head strides
enum { B_B, B_HQ, B_HKV, B_L, B_LK, B_D, B_DV, B_LO, B_HI, B_Q0, B_Q1, B_BQ, B_QSB, B_QSH, B_KSB,
       B_KSH, B_VSB, B_VSH, B_DOSB, B_DOSH, B_NSEG, B_WCOLS, B_WSTR, B_WKEY0,
       B_NGEO };

// The key window [*j0, *j1) of query rows [i0, i1) and, for row i, its band [a, e) in window
// coordinates.
static void window(const int64_t *g, int64_t i0, int64_t i1, int64_t *j0, int64_t *j1) {
  int64_t delta = g[B_LK] - g[B_L];
  *j0 = i0 + delta + g[B_LO];
  *j1 = i1 - 1 + delta + g[B_HI] + 1;
  if (*j0 < 0) *j0 = 0;
  if (*j1 > g[B_LK]) *j1 = g[B_LK];
}

static void row_band(const int64_t *g, int64_t i, int64_t j0, int64_t W, int64_t *a, int64_t *e) {
  int64_t delta = g[B_LK] - g[B_L];
  *a = i + delta + g[B_LO] - j0;
  *e = i + delta + g[B_HI] + 1 - j0;
  if (*a < 0) *a = 0;
  if (*e > W) *e = W;
}

// Keys a segment of rows [r0, r1) owns (segments partition [0, Lk) in order) and the keys its
// rows reach [*t0, *t1) (t0 >= the owned start; beyond the owned end: at most hi - lo keys).
static void segment_keys(const int64_t *g, int64_t s, int64_t nseg, int64_t r0, int64_t r1,
                         int64_t *o0, int64_t *o1, int64_t *t0, int64_t *t1) {
  int64_t delta = g[B_LK] - g[B_L], lk = g[B_LK];
  int64_t a = r0 + delta + g[B_LO], z = r1 + delta + g[B_LO];
  *o0 = s == 0 ? 0 : (a < 0 ? 0 : a > lk ? lk : a);
  *o1 = s == nseg - 1 ? lk : (z < 0 ? 0 : z > lk ? lk : z);
  window(g, r0, r1, t0, t1);
  if (*t0 > lk) *t0 = lk;
  if (*t1 < *t0) *t1 = *t0;
}

#define BAND_BODY
#define R float
#define GEMM_T sgemm_t
#define RT_GEMM RT_SGEMM
#define EXP expf
#define LOG logf
#define FN(name) name##_f32
#ifdef __AVX2__
#define VEC 1
#else
#define VEC 0
#endif
#include "band_cpu.c"
#undef R
#undef GEMM_T
#undef RT_GEMM
#undef EXP
#undef LOG
#undef FN
#undef VEC
#define R double
#define GEMM_T dgemm_t
#define RT_GEMM RT_DGEMM
#define EXP exp
#define LOG log
#define FN(name) name##_f64
#define VEC 0
#include "band_cpu.c"

#else  // ---------------------------------------------------------------- body, per type R

typedef struct {
  const R *q, *k, *v, *dout, *lse, *dlse;
  R *out, *lse_out, *dq, *dk, *dv, *halo;
  const int64_t *g;
  const int64_t *offs; int64_t *idx; R *wout; int *bad;  // weights: CSR runs and a bounds flag
  int64_t nblocks, segblocks, nseg;  // backward: blocks per segment, segments per kv head
  GEMM_T gemm; setthreads_t setthreads;
} FN(job_t);

// softmax of s[a:b) in place (rest of the row zeroed); returns lse (-inf if empty)
static R FN(row_softmax)(R *s, int64_t W, int64_t a, int64_t b) {
  if (a >= b) { memset(s, 0, W * sizeof(R)); return -INFINITY; }
  if (a > 0) memset(s, 0, a * sizeof(R));
  if (b < W) memset(s + b, 0, (W - b) * sizeof(R));
  R *x = s + a; int64_t n = b - a, i = 0;
  R m = -INFINITY;
#if VEC
  __m256 vm = _mm256_set1_ps(-INFINITY);
  for (; i + 8 <= n; i += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(x + i));
  m = hmax(vm);
#endif
  for (; i < n; i++) m = x[i] > m ? x[i] : m;
  R sum = 0.f; i = 0;
#if VEC
  __m256 vs = _mm256_setzero_ps(), vmm = _mm256_set1_ps(m);
  for (; i + 8 <= n; i += 8) {
    __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + i), vmm));
    _mm256_storeu_ps(x + i, e); vs = _mm256_add_ps(vs, e);
  }
  sum = hsum(vs);
#endif
  for (; i < n; i++) { R e = EXP(x[i] - m); x[i] = e; sum += e; }
  R inv = 1.f / sum; i = 0;
#if VEC
  __m256 vi = _mm256_set1_ps(inv);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), vi));
#endif
  for (; i < n; i++) x[i] *= inv;
  return m + LOG(sum);
}

// Row i's run of n probabilities p (first key j) into the CSR buffer at offs[i] (and the keys,
// from the first head only); a run outside the buffer is skipped and flagged.
static void FN(put_run)(const FN(job_t) *J, int64_t bh, int64_t i, const R *p, int64_t n,
                        int64_t j) {
  int64_t off = J->offs[i];
  if (off < 0 || off > J->g[B_WCOLS] - n) { __atomic_store_n(J->bad, 1, __ATOMIC_RELAXED); return; }
  memcpy(J->wout + bh * J->g[B_WSTR] + off, p, n * sizeof(R));
  if (J->idx && bh == 0)
    for (int64_t t = 0; t < n; t++) J->idx[off + t] = J->g[B_WKEY0] + j + t;
}

static void FN(forward_worker)(team_t *TM) {
  const FN(job_t) *J = (const FN(job_t) *)TM->arg;
  const int64_t *g = J->g;
  int64_t Hq = g[B_HQ], grp = Hq / g[B_HKV], bq = g[B_BQ], wmax = bq + g[B_HI] - g[B_LO];
  int64_t q0 = g[B_Q0], q1 = g[B_Q1], d = g[B_D], dv = g[B_DV], nrows = q1 - q0;
  R *S = (R *)malloc(sizeof(R) * bq * (wmax > 0 ? wmax : 1));
  if (!S) return;  // items left to the other threads (team_run reports any not done)
  if (J->setthreads) J->setthreads(1);
  const R one = 1.f, zero = 0.f; const char T = 'T', N = 'N';
  int64_t start, stop;
  while (team_next(TM, &start, &stop)) {
    for (int64_t it = start; it < stop; it++) {
      int64_t blk = it % J->nblocks, bh = it / J->nblocks;
      int64_t b = bh / Hq, h = bh % Hq, hk = h / grp;
      int64_t i0 = q0 + blk * bq, i1 = i0 + bq < q1 ? i0 + bq : q1, nq = i1 - i0, j0, j1;
      window(g, i0, i1, &j0, &j1);
      const R *qp = J->q + b * g[B_QSB] + h * g[B_QSH] + i0 * d;
      R *op = J->out + ((b * Hq + h) * nrows + (i0 - q0)) * dv;
      R *lp = J->lse_out + (b * Hq + h) * nrows + (i0 - q0);
      if (j1 <= j0) {
        memset(op, 0, sizeof(R) * nq * dv);
        for (int64_t r = 0; r < nq; r++) lp[r] = -INFINITY;
        continue;
      }
      int W = (int)(j1 - j0), M = (int)nq, D = (int)d, DV = (int)dv;
      const R *kp = J->k + b * g[B_KSB] + hk * g[B_KSH] + j0 * d;
      const R *vp = J->v + b * g[B_VSB] + hk * g[B_VSH] + j0 * dv;
      // S^T (W x M, col-major, ld W) = K (W x D) * Q^T
      J->gemm(&T, &N, &W, &M, &D, &one, kp, &D, qp, &D, &zero, S, &W);
      for (int64_t r = 0; r < nq; r++) {
        int64_t a, e;
        row_band(g, i0 + r, j0, W, &a, &e);
        lp[r] = FN(row_softmax)(S + r * W, W, a, e);
        if (J->wout && e > a) FN(put_run)(J, bh, i0 + r - q0, S + r * W + a, e - a, j0 + a);
      }
      // O^T (DV x M, ld DV) = V^T (DV x W) * P^T (W x M)
      J->gemm(&N, &N, &DV, &M, &W, &one, vp, &DV, S, &W, &zero, op, &DV);
    }
    team_done(TM, stop - start);
  }
  free(S);
  if (J->setthreads) J->setthreads(0);  // back to the global MKL thread count
}

// ptr: q, k, v, out, lse, then the optional weights output: values (B * Hq rows B_WSTR apart,
// B_WCOLS columns) or 0, offs (q1 - q0,), indices (B_WCOLS,) or 0; row i's probabilities go to
// values[bh, offs[i - q0] ..] and its keys (plus B_WKEY0) to indices. geo: every B_* slot.
// Computes rows [q0, q1). Returns 0, -1 (out of memory) or -2 (a run outside the buffer).
int FN(band_forward)(const int64_t *ptr, const int64_t *geo, double scale, int nthreads,
                 void *const *rt) {
  (void)scale;  // q arrives pre-scaled
  FN(job_t) J;
  memset(&J, 0, sizeof J);
  int bad = 0;
  J.q = (const R *)ptr[0]; J.k = (const R *)ptr[1]; J.v = (const R *)ptr[2];
  J.out = (R *)ptr[3]; J.lse_out = (R *)ptr[4];
  J.wout = (R *)ptr[5]; J.offs = (const int64_t *)ptr[6]; J.idx = (int64_t *)ptr[7];
  J.bad = &bad;
  J.g = geo;
  J.nblocks = (geo[B_Q1] - geo[B_Q0] + geo[B_BQ] - 1) / geo[B_BQ];
  J.gemm = (GEMM_T)rt[RT_GEMM]; J.setthreads = (setthreads_t)rt[RT_SET_BLAS_THREADS];
  // blocks are independent (each reads its own rows and key window): small chunks, so a
  // preempted thread's rest goes to the others
  int err = team_run_shares(FN(forward_worker), &J, geo[B_B] * geo[B_HQ] * J.nblocks, nthreads,
                            4, rt[RT_OMP_PARALLEL]);
  return err ? -1 : (__atomic_load_n(&bad, __ATOMIC_RELAXED) ? -2 : 0);
}

// w[t] = exp(s[t] - l), t < n (0 for a row without mass: l = -inf)
static void FN(row_exp)(R *w, const R *s, int64_t n, R l) {
  if (l == -INFINITY) { memset(w, 0, n * sizeof(R)); return; }
  int64_t t = 0;
#if VEC
  __m256 vl = _mm256_set1_ps(l);
  for (; t + 8 <= n; t += 8)
    _mm256_storeu_ps(w + t, exp256(_mm256_sub_ps(_mm256_loadu_ps(s + t), vl)));
#endif
  for (; t < n; t++) w[t] = EXP(s[t] - l);
}

static void FN(weights_worker)(team_t *TM) {
  const FN(job_t) *J = (const FN(job_t) *)TM->arg;
  const int64_t *g = J->g;
  int64_t Hq = g[B_HQ], grp = Hq / g[B_HKV], bq = g[B_BQ], wmax = bq + g[B_HI] - g[B_LO];
  int64_t L = g[B_L], d = g[B_D], ncol = g[B_WCOLS], wstr = g[B_WSTR];
  R *S = (R *)malloc(sizeof(R) * bq * (wmax > 0 ? wmax : 1));
  if (!S) return;  // items left to the other threads (team_run reports any not done)
  if (J->setthreads) J->setthreads(1);
  const R one = 1.f, zero = 0.f; const char T = 'T', N = 'N';
  int64_t start, stop;
  while (team_next(TM, &start, &stop)) {
    for (int64_t it = start; it < stop; it++) {
      int64_t blk = it % J->nblocks, bh = it / J->nblocks;
      int64_t b = bh / Hq, h = bh % Hq, hk = h / grp;
      int64_t i0 = blk * bq, i1 = i0 + bq < L ? i0 + bq : L, j0, j1;
      window(g, i0, i1, &j0, &j1);
      if (j1 <= j0) continue;  // no key for any row of the block: nothing to write
      int W = (int)(j1 - j0), M = (int)(i1 - i0), D = (int)d;
      const R *qp = J->q + b * g[B_QSB] + h * g[B_QSH] + i0 * d;
      const R *kp = J->k + b * g[B_KSB] + hk * g[B_KSH] + j0 * d;
      const R *lp = J->lse + bh * L + i0;
      R *wrow = J->wout + bh * wstr;
      int64_t *ix = bh == 0 ? J->idx : NULL;  // the keys once, from the first head
      J->gemm(&T, &N, &W, &M, &D, &one, kp, &D, qp, &D, &zero, S, &W);
      for (int64_t r = 0; r < M; r++) {
        int64_t a, e;
        row_band(g, i0 + r, j0, W, &a, &e);
        if (a >= e) continue;
        int64_t off = J->offs[i0 + r], n = e - a;
        if (off < 0 || off > ncol - n) { __atomic_store_n(J->bad, 1, __ATOMIC_RELAXED); continue; }
        FN(row_exp)(wrow + off, S + r * W + a, n, lp[r]);
        if (ix) for (int64_t t = 0; t < n; t++) ix[off + t] = j0 + a + t;
      }
    }
    team_done(TM, stop - start);
  }
  free(S);
  if (J->setthreads) J->setthreads(0);
}

// ptr: q, k, lse (B * Hq, L) contiguous, values (B * Hq rows B_WSTR apart, B_WCOLS columns),
// offs (L,), indices (B_WCOLS,) or 0. geo: the B_* slots of the forward (q0 = 0, q1 = L) plus
// B_WCOLS, B_WSTR. Returns 0, -1 (out of memory) or -2 (a row's run out of the buffer; that
// row was skipped).
int FN(band_weights)(const int64_t *ptr, const int64_t *geo, double scale, int nthreads,
                     void *const *rt) {
  (void)scale;  // q arrives pre-scaled
  FN(job_t) J;
  memset(&J, 0, sizeof J);
  int bad = 0;
  J.q = (const R *)ptr[0]; J.k = (const R *)ptr[1]; J.lse = (const R *)ptr[2];
  J.wout = (R *)ptr[3]; J.offs = (const int64_t *)ptr[4]; J.idx = (int64_t *)ptr[5];
  J.bad = &bad;
  J.g = geo;
  J.nblocks = (geo[B_L] + geo[B_BQ] - 1) / geo[B_BQ];
  J.gemm = (GEMM_T)rt[RT_GEMM]; J.setthreads = (setthreads_t)rt[RT_SET_BLAS_THREADS];
  int err = team_run_shares(FN(weights_worker), &J, geo[B_B] * geo[B_HQ] * J.nblocks, nthreads,
                            4, rt[RT_OMP_PARALLEL]);
  return err ? -1 : (__atomic_load_n(&bad, __ATOMIC_RELAXED) ? -2 : 0);
}

// P = exp(S - lse) over [a, e) of each row (zeros elsewhere); D = rowsum(P * dP) - dlse;
// dS = P * (dP - D) in place of dP. Rows of W entries.
static void FN(probs_and_dscores)(R *S, R *dP, int64_t W, int64_t a, int64_t e, R lse,
                              R dlse) {
  if (a >= e || lse == -INFINITY) {
    memset(S, 0, W * sizeof(R));
    memset(dP, 0, W * sizeof(R));
    return;
  }
  if (a > 0) { memset(S, 0, a * sizeof(R)); memset(dP, 0, a * sizeof(R)); }
  if (e < W) {
    memset(S + e, 0, (W - e) * sizeof(R));
    memset(dP + e, 0, (W - e) * sizeof(R));
  }
  R *p = S + a, *dp = dP + a, dsum = 0.f;
  int64_t n = e - a, i = 0;
#if VEC
  __m256 vl = _mm256_set1_ps(lse), acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    __m256 pv = exp256(_mm256_sub_ps(_mm256_loadu_ps(p + i), vl));
    _mm256_storeu_ps(p + i, pv);
    acc = _mm256_fmadd_ps(pv, _mm256_loadu_ps(dp + i), acc);
  }
  dsum = hsum(acc);
#endif
  for (; i < n; i++) { p[i] = EXP(p[i] - lse); dsum += p[i] * dp[i]; }
  R D = dsum - dlse;
  i = 0;
#if VEC
  __m256 vd = _mm256_set1_ps(D);
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dp + i, _mm256_mul_ps(_mm256_loadu_ps(p + i),
                                           _mm256_sub_ps(_mm256_loadu_ps(dp + i), vd)));
#endif
  for (; i < n; i++) dp[i] = p[i] * (dp[i] - D);
}

static void FN(backward_worker)(team_t *TM) {
  const FN(job_t) *J = (const FN(job_t) *)TM->arg;
  const int64_t *g = J->g;
  int64_t Hq = g[B_HQ], Hkv = g[B_HKV], grp = Hq / Hkv, bq = g[B_BQ], L = g[B_L], Lk = g[B_LK];
  int64_t d = g[B_D], dv = g[B_DV], nseg = J->nseg, span = g[B_HI] - g[B_LO];
  int64_t wmax = bq + span, tmax = J->segblocks * bq + span + 1;
  R *S = (R *)malloc(sizeof(R) * (2 * bq * wmax + tmax * (d + dv)));
  if (!S) return;  // items left to the other threads (team_run reports any not done)
  R *dP = S + bq * wmax, *dKb = dP + bq * wmax, *dVb = dKb + tmax * d;
  if (J->setthreads) J->setthreads(1);
  const R one = 1.f, zero = 0.f; const char T = 'T', N = 'N';
  const int D = (int)d, DV = (int)dv;
  int64_t start, stop;
  while (team_next(TM, &start, &stop)) {
    for (int64_t it = start; it < stop; it++) {
      int64_t s = it % nseg, bk = it / nseg, b = bk / Hkv, hk = bk % Hkv;
      int64_t r0 = s * J->segblocks * bq, r1 = r0 + J->segblocks * bq;
      if (r1 > L) r1 = L;
      int64_t o0, o1, t0, t1;
      segment_keys(g, s, nseg, r0, r1, &o0, &o1, &t0, &t1);
      memset(dKb, 0, sizeof(R) * (t1 - t0) * d);
      memset(dVb, 0, sizeof(R) * (t1 - t0) * dv);
      const R *kh = J->k + b * g[B_KSB] + hk * g[B_KSH];
      const R *vh = J->v + b * g[B_VSB] + hk * g[B_VSH];
      for (int64_t i0 = r0; i0 < r1; i0 += bq) {
        int64_t i1 = i0 + bq < r1 ? i0 + bq : r1, nq = i1 - i0, j0, j1;
        window(g, i0, i1, &j0, &j1);
        for (int64_t h = hk * grp; h < (hk + 1) * grp; h++) {
          R *dqp = J->dq + ((b * Hq + h) * L + i0) * d;
          if (j1 <= j0) { memset(dqp, 0, sizeof(R) * nq * d); continue; }
          int W = (int)(j1 - j0), M = (int)nq;
          const R *qp = J->q + b * g[B_QSB] + h * g[B_QSH] + i0 * d;
          const R *dop = J->dout + b * g[B_DOSB] + h * g[B_DOSH] + i0 * dv;
          const R *lp = J->lse + (b * Hq + h) * L + i0;
          const R *dlp = J->dlse ? J->dlse + (b * Hq + h) * L + i0 : NULL;
          const R *kp = kh + j0 * d, *vp = vh + j0 * dv;
          // S (M x W, row-major) = Q K^T; dP = dO V^T (as the forward's S^T, col-major)
          J->gemm(&T, &N, &W, &M, &D, &one, kp, &D, qp, &D, &zero, S, &W);
          J->gemm(&T, &N, &W, &M, &DV, &one, vp, &DV, dop, &DV, &zero, dP, &W);
          for (int64_t r = 0; r < nq; r++) {
            int64_t a, e;
            row_band(g, i0 + r, j0, W, &a, &e);
            FN(probs_and_dscores)(S + r * W, dP + r * W, W, a, e, lp[r], dlp ? dlp[r] : 0.f);
          }
          // dQ (M x d) = dS K: col-major dQ^T (d x M) = K^T (d x W) dS^T (W x M)
          J->gemm(&N, &N, &D, &M, &W, &one, kp, &D, dP, &W, &zero, dqp, &D);
          // dK_win (W x d) += dS^T Q: col-major dK^T (d x W) += Q^T (d x M) dS (M x W)
          R *dkw = dKb + (j0 - t0) * d, *dvw = dVb + (j0 - t0) * dv;
          J->gemm(&N, &T, &D, &W, &M, &one, qp, &D, dP, &W, &one, dkw, &D);
          // dV_win (W x dv) += P^T dO
          J->gemm(&N, &T, &DV, &W, &M, &one, dop, &DV, S, &W, &one, dvw, &DV);
        }
      }
      // owned keys: stored (zeros where no row of the segment reaches); the rest: the halo
      R *dkh = J->dk + (b * Hkv + hk) * Lk * d, *dvh = J->dv + (b * Hkv + hk) * Lk * dv;
      int64_t in1 = t1 < o1 ? t1 : o1;
      memset(dkh + o0 * d, 0, sizeof(R) * (t0 - o0) * d);
      memset(dvh + o0 * dv, 0, sizeof(R) * (t0 - o0) * dv);
      if (in1 > t0) {
        memcpy(dkh + t0 * d, dKb, sizeof(R) * (in1 - t0) * d);
        memcpy(dvh + t0 * dv, dVb, sizeof(R) * (in1 - t0) * dv);
      }
      int64_t z0 = in1 > t0 ? in1 : t0;
      if (o1 > z0) {
        memset(dkh + z0 * d, 0, sizeof(R) * (o1 - z0) * d);
        memset(dvh + z0 * dv, 0, sizeof(R) * (o1 - z0) * dv);
      }
      if (t1 > o1 && J->halo) {
        R *hp = J->halo + it * span * (d + dv);
        memcpy(hp, dKb + (o1 - t0) * d, sizeof(R) * (t1 - o1) * d);
        memcpy(hp + span * d, dVb + (o1 - t0) * dv, sizeof(R) * (t1 - o1) * dv);
      }
    }
    team_done(TM, stop - start);
  }
  free(S);
  if (J->setthreads) J->setthreads(0);
}

// ptr: q, k, v, dout, lse (B, Hq, L), dlse (B, Hq, L) or 0, dq (B, Hq, L, d), dk (B, Hkv, Lk, d),
// dv (B, Hkv, Lk, dv) (the last five contiguous). geo: every B_* slot (q0, q1 unused: all rows;
// B_NSEG: segments of rows per kv head asked for, >= 1). Every element of dq, dk, dv is written.
int FN(band_backward)(const int64_t *ptr, const int64_t *geo, double scale, int nthreads,
                  void *const *rt) {
  (void)scale;  // q arrives pre-scaled; the caller applies the scale to dq
  FN(job_t) J;
  memset(&J, 0, sizeof J);
  J.q = (const R *)ptr[0]; J.k = (const R *)ptr[1]; J.v = (const R *)ptr[2];
  J.dout = (const R *)ptr[3]; J.lse = (const R *)ptr[4];
  J.dlse = (const R *)ptr[5];
  J.dq = (R *)ptr[6]; J.dk = (R *)ptr[7]; J.dv = (R *)ptr[8];
  J.g = geo;
  int64_t nseg = geo[B_NSEG], bq = geo[B_BQ], L = geo[B_L], d = geo[B_D], dv = geo[B_DV];
  int64_t nblocks = (L + bq - 1) / bq;
  if (nblocks < 1) {  // no query rows: no gradient reaches the keys
    memset(J.dk, 0, sizeof(R) * geo[B_B] * geo[B_HKV] * geo[B_LK] * d);
    memset(J.dv, 0, sizeof(R) * geo[B_B] * geo[B_HKV] * geo[B_LK] * dv);
    return 0;
  }
  if (nseg < 1) nseg = 1;
  if (nseg > nblocks) nseg = nblocks;
  J.segblocks = (nblocks + nseg - 1) / nseg;
  J.nseg = nseg = (nblocks + J.segblocks - 1) / J.segblocks;  // none of them empty
  J.gemm = (GEMM_T)rt[RT_GEMM]; J.setthreads = (setthreads_t)rt[RT_SET_BLAS_THREADS];
  int64_t span = geo[B_HI] - geo[B_LO], items = geo[B_B] * geo[B_HKV] * nseg;
  if (nseg > 1 && span > 0) {
    J.halo = (R *)malloc(sizeof(R) * items * span * (d + dv));
    if (!J.halo) return -1;
  }
  int err = team_run_shares(FN(backward_worker), &J, items, nthreads, 4, rt[RT_OMP_PARALLEL]);
  if (!err && J.halo) {
    // each segment's halo into the keys of the segments after it (in order: halos may overlap)
    int64_t Lk = geo[B_LK];
    for (int64_t it = 0; it < items; it++) {
      int64_t s = it % nseg, bk = it / nseg;
      int64_t r0 = s * J.segblocks * bq, r1 = r0 + J.segblocks * bq, o0, o1, t0, t1;
      if (r1 > L) r1 = L;
      segment_keys(geo, s, nseg, r0, r1, &o0, &o1, &t0, &t1);
      const R *hp = J.halo + it * span * (d + dv);
      R *dkh = J.dk + bk * Lk * d, *dvh = J.dv + bk * Lk * dv;
      for (int64_t j = o1; j < t1; j++) {
        for (int64_t c = 0; c < d; c++) dkh[j * d + c] += hp[(j - o1) * d + c];
        for (int64_t c = 0; c < dv; c++) dvh[j * dv + c] += hp[span * d + (j - o1) * dv + c];
      }
    }
  }
  free(J.halo);
  return err ? -1 : 0;
}
#endif

// Matrix-vector products for decoding (loaded by attnkit/kernels/native.py via ctypes).
//
// y (R, O) = x (R, I) @ W (O, I)^T + bias (O,), for the few rows R of a decoding step, fp32,
// all contiguous. A step is bound by reading W from memory; a BLAS gemv reads it on one thread,
// here each thread of the team streams its own contiguous block of W's rows (and the thread
// that finishes first takes the last rows of another's), so the whole memory bandwidth is used,
// each row of W read as one sequential stream. With gelu set, y = GELU(y) (the exact erf form,
// as torch.nn.functional.gelu) is applied in the same pass.
// Several weights that multiply the same x can go in one call (segments of one output row).
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <pthread.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif
#include "team.h"
#include "vecmath.h"

// Up to MAX_SEG weights share one x and one output row: segment s writes columns
// [off[s], off[s] + O[s]) of y (row stride ldy). One call, one wake-up of the thread team, for
// several products of the same input (a layer's query, key and value projections).
#define MAX_SEG 3
// 4-row groups a thread takes at a time from its block of W (or, when done, from the back of
// another's: team_run_steal). Measured on the 768-wide decoding step (same-process A/B, 2
// threads): the threads' idle time at the products' ends 14% -> 5% of their time (perf), the
// step ~2% faster; grains of 2, 4 and 8 groups alike.
#define GEMV_GRAIN 2

typedef struct {
  const float *x, *res; float *y;
  int64_t R, I, ldy;
  int nseg, gelu;
  const float *W[MAX_SEG], *bias[MAX_SEG];
  int64_t O[MAX_SEG], off[MAX_SEG], quad0[MAX_SEG + 1];  // quad0: first 4-row group of s
} gemv_t;

// y[r, off + o] for rows o in [o0, o1) of segment s's W and every row r of x. Each row of W
// is read as one sequential stream (four independent accumulators hide the FMA latency): on
// the machines measured, interleaving four rows' streams reached only ~2/3 of the read bandwidth
// a single stream gets. The row stays in L1 for the other rows of x, so W is read from memory
// once.
static void gemv_block(const gemv_t *G, int s, int64_t o0, int64_t o1) {
  const int64_t I = G->I, ldy = G->ldy;
  const float *W = G->W[s], *bias = G->bias[s];
  float *Y = G->y + G->off[s];
  int64_t o = o0;
#ifdef __AVX2__
  for (; o < o1; o++) {
    const float *w = W + o * I;
    for (int64_t r = 0; r < G->R; r++) {
      const float *x = G->x + r * I;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      int64_t i = 0;
      for (; i + 32 <= I; i += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 16), _mm256_loadu_ps(x + i + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 24), _mm256_loadu_ps(x + i + 24), a3);
      }
      for (; i + 8 <= I; i += 8)
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
      float acc = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
      for (; i < I; i++) acc += w[i] * x[i];
      Y[r * ldy + o] = acc;
    }
  }
#endif
  for (; o < o1; o++) {
    const float *w = W + o * I;
    for (int64_t r = 0; r < G->R; r++) {
      const float *x = G->x + r * I;
      float acc = 0.f;
      for (int64_t i = 0; i < I; i++) acc += w[i] * x[i];
      Y[r * ldy + o] = acc;
    }
  }
  if (bias)
    for (int64_t r = 0; r < G->R; r++)
      for (o = o0; o < o1; o++) Y[r * ldy + o] += bias[o];
  if (G->gelu)
    for (int64_t r = 0; r < G->R; r++)
      for (o = o0; o < o1; o++) {
        float v = Y[r * ldy + o];
        Y[r * ldy + o] = 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
      }
  if (G->res) {
    const float *res = G->res + G->off[s];
    for (int64_t r = 0; r < G->R; r++)
      for (o = o0; o < o1; o++) Y[r * ldy + o] += res[r * ldy + o];
  }
}

// 4-row groups [q0, q1), over all segments in turn (a chunk of the team's work: each thread
// keeps the 4-row inner loop and streams its own contiguous part of the weights)
static void gemv_quads(const gemv_t *G, int64_t q0, int64_t q1) {
  for (int s = 0; s < G->nseg; s++) {
    int64_t a = q0 > G->quad0[s] ? q0 : G->quad0[s];
    int64_t b = q1 < G->quad0[s + 1] ? q1 : G->quad0[s + 1];
    if (a >= b) continue;
    int64_t o0 = 4 * (a - G->quad0[s]), o1 = 4 * (b - G->quad0[s]);
    if (o1 > G->O[s]) o1 = G->O[s];
    if (o0 < o1) gemv_block(G, s, o0, o1);
  }
}

static void gemv_worker(team_t *TM) {
  int64_t start, stop;
  int own = -1;
  while (team_next_steal(TM, &own, &start, &stop)) {  // (gemv_rows: team_run_steal)
    gemv_quads((const gemv_t *)TM->arg, start, stop);
    team_done(TM, stop - start);
  }
}

// Each row of x replaced by LayerNorm(x) (as torch.nn.functional.layer_norm: biased variance,
// eps inside the square root; ln_w / ln_b may be NULL), written to xn (R, I).
static void layer_norm_rows(const float *x, float *xn, int64_t R, int64_t I, const float *ln_w,
                            const float *ln_b, double eps) {
  for (int64_t r = 0; r < R; r++) {
    const float *a = x + r * I;
    float *b = xn + r * I;
    double mean = 0.0, var = 0.0;
    for (int64_t i = 0; i < I; i++) mean += a[i];
    mean /= (double)I;
    for (int64_t i = 0; i < I; i++) { double d = a[i] - mean; var += d * d; }
    float inv = (float)(1.0 / sqrt(var / (double)I + eps)), m = (float)mean;
    for (int64_t i = 0; i < I; i++) {
      float v = (a[i] - m) * inv;
      if (ln_w) v *= ln_w[i];
      if (ln_b) v += ln_b[i];
      b[i] = v;
    }
  }
}

// Rotary position embedding ("rotate-half" layout) of the first rope_cols columns of each row
// of y, in heads of rope_dim channels: c' = c * cos[i] + c_partner * ssin[i], where the partner
// of channel i is i +- rope_dim / 2 and ssin is the sine with rotate-half's sign folded in. Row
// r holds position r % rope_len of the (rope_len, rope_dim) tables.
static void rope_rows(float *y, int64_t R, int64_t ldy, const float *cos_t, const float *ssin_t,
                      int64_t cols, int64_t dim, int64_t len) {
  const int64_t half = dim / 2;
  for (int64_t r = 0; r < R; r++) {
    const float *c = cos_t + (r % len) * dim, *sn = ssin_t + (r % len) * dim;
    for (int64_t h0 = 0; h0 + dim <= cols; h0 += dim) {
      float *a = y + r * ldy + h0, *b = a + half;
      for (int64_t i = 0; i < half; i++) {
        float u = a[i], v = b[i];
        a[i] = u * c[i] + v * sn[i];
        b[i] = v * c[half + i] + u * sn[half + i];
      }
    }
  }
}

// y (R, sum O): segment s = x (R, I) @ Ws (Os, I)^T + bs in the columns after the earlier
// segments' (bs may be NULL; segments past nseg are ignored); then GELU with gelu set; then
// + res (R, sum O) when res is not NULL (a residual connection); then the rotary embedding of
// the first rope_cols columns when rope_cols > 0.
// With ln set, x is first replaced by LayerNorm(x) (ln_w, ln_b, ln_eps). Every pointer is to
// contiguous data of the sizes given (the caller checks). Returns -1 for a bad segment count
// or a failed allocation, else 0.
// ptr: x, y, W0, W1, W2, b0, b1, b2, res, ln_w, ln_b, rope_cos, rope_sin (0: absent).
// geo: GV_* slots. scale: the LayerNorm's eps. rt: team.h's runtime hooks (only the first).
enum { GV_R, GV_I, GV_NSEG, GV_O0, GV_O1, GV_O2, GV_GELU, GV_LN, GV_ROPE_COLS, GV_ROPE_DIM,
       GV_ROPE_LEN, GV_NGEO };

int gemv_rows(const int64_t *ptr, const int64_t *geo, double ln_eps, int nthreads,
              void *const *rt) {
  const float *x = (const float *)ptr[0];
  float *y = (float *)ptr[1];
  const float *W0 = (const float *)ptr[2], *W1 = (const float *)ptr[3],
              *W2 = (const float *)ptr[4], *b0 = (const float *)ptr[5],
              *b1 = (const float *)ptr[6], *b2 = (const float *)ptr[7],
              *res = (const float *)ptr[8], *ln_w = (const float *)ptr[9],
              *ln_b = (const float *)ptr[10], *rope_cos = (const float *)ptr[11],
              *rope_sin = (const float *)ptr[12];
  int64_t R = geo[GV_R], I = geo[GV_I], O0 = geo[GV_O0], O1 = geo[GV_O1], O2 = geo[GV_O2];
  int64_t rope_cols = geo[GV_ROPE_COLS], rope_dim = geo[GV_ROPE_DIM], rope_len = geo[GV_ROPE_LEN];
  int nseg = (int)geo[GV_NSEG], gelu = (int)geo[GV_GELU], ln = (int)geo[GV_LN];
  void *omp_parallel = rt[RT_OMP_PARALLEL];
  if (nseg < 1 || nseg > MAX_SEG) return -1;
  float *xn = NULL;
  if (ln) {
    xn = (float *)malloc(sizeof(float) * R * I);
    if (!xn) return -1;
    layer_norm_rows(x, xn, R, I, ln_w, ln_b, ln_eps);
    x = xn;
  }
  gemv_t G;
  const float *W[MAX_SEG] = {W0, W1, W2}, *bias[MAX_SEG] = {b0, b1, b2};
  int64_t O[MAX_SEG] = {O0, O1, O2};
  G.x = x; G.res = res; G.y = y; G.R = R; G.I = I; G.nseg = nseg; G.gelu = gelu;
  G.quad0[0] = 0;
  int64_t ldy = 0;
  for (int s = 0; s < nseg; s++) {
    G.W[s] = W[s]; G.bias[s] = bias[s]; G.O[s] = O[s]; G.off[s] = ldy;
    ldy += O[s];
    G.quad0[s + 1] = G.quad0[s] + (O[s] + 3) / 4;
  }
  G.ldy = ldy;
  int err = team_run_steal(gemv_worker, &G, G.quad0[nseg], nthreads, GEMV_GRAIN, omp_parallel);
  free(xn);
  if (rope_cols > 0 && rope_dim >= 2 && rope_len >= 1)
    rope_rows(y, R, ldy, rope_cos, rope_sin, rope_cols, rope_dim, rope_len);
  return err ? -1 : 0;
}

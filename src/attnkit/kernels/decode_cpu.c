// Decoding attention for attnkit (loaded by attnkit/kernels/native.py via ctypes; calling
// convention in team.h): a few query rows per key/value head (a cached decoding step, the query
// heads of a group stacked as rows) against every key. Keys are split into chunks (split-K,
// "flash-decoding") so that all threads work even when there is one key/value head; each chunk
// is one pass of scores, an exp pass and one pass for the partial output; the chunks' partial
// results merge through their row maxima and sums. Each thread reads its chunk of K and V
// sequentially once, for all rows.
// q (BH, M, d) contiguous, scores scaled by `scale`; k, v rows contiguous (row stride d / dv)
// with stride ks / vs between the BH heads; out (BH, M, dv); lse (BH, M).
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include "team.h"
#include "vecmath.h"

// geometry slots; D_NSPLIT: key chunks per head, or 0 for decode_split's choice
enum { D_BH, D_M, D_LK, D_D, D_DV, D_KS, D_VS, D_NSPLIT, D_NGEO };

// Keys per chunk below which a head's keys are not split further.
#define DECODE_MIN_CHUNK 256

// Chunks per head: enough for every thread, none shorter than DECODE_MIN_CHUNK keys.
static int64_t decode_split(int nthreads, int64_t heads, int64_t lk) {
  int64_t want = heads > 0 ? (nthreads + heads - 1) / heads : 1, most = lk / DECODE_MIN_CHUNK;
  int64_t n = want < most ? want : most;
  return n < 1 ? 1 : n;
}

#ifdef __AVX2__
// Register-blocked products for the few rows of a decoding step (an sgemm pays its packing and
// blocking for shapes this skinny). Both need d % 8 == 0 and dv % 32 == 0.

// S (M x W, row stride W) = scale * q (M x d) @ kc (W x d)^T; two rows and four keys at a time:
// six loads feed eight FMAs, so the FMA units, not the loads, set the pace.
static void decode_scores(const float *q, const float *kc, float *S, int64_t M, int64_t W,
                          int64_t d, float scale) {
  for (int64_t j0 = 0; j0 < W; j0 += 64) {  // 64 keys (16 KB at d = 64) stay in L1 for all rows
    int64_t j1 = j0 + 64 < W ? j0 + 64 : W;
    for (int64_t r = 0; r < M; r += 2) {
      const int two = r + 1 < M;
      const float *qa = q + r * d, *qb = two ? qa + d : qa;
      int64_t j = j0;
      for (; j + 4 <= j1; j += 4) {
        const float *k0 = kc + j * d, *k1 = k0 + d, *k2 = k1 + d, *k3 = k2 + d;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        __m256 b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        for (int64_t c = 0; c < d; c += 8) {
          __m256 x = _mm256_loadu_ps(qa + c), y = _mm256_loadu_ps(qb + c);
          __m256 u = _mm256_loadu_ps(k0 + c);
          a0 = _mm256_fmadd_ps(x, u, a0); b0 = _mm256_fmadd_ps(y, u, b0);
          u = _mm256_loadu_ps(k1 + c);
          a1 = _mm256_fmadd_ps(x, u, a1); b1 = _mm256_fmadd_ps(y, u, b1);
          u = _mm256_loadu_ps(k2 + c);
          a2 = _mm256_fmadd_ps(x, u, a2); b2 = _mm256_fmadd_ps(y, u, b2);
          u = _mm256_loadu_ps(k3 + c);
          a3 = _mm256_fmadd_ps(x, u, a3); b3 = _mm256_fmadd_ps(y, u, b3);
        }
        // four horizontal sums at once: lanes of (a0 a1 a2 a3) -> one 4-float vector
        __m256 h01 = _mm256_hadd_ps(a0, a1), h23 = _mm256_hadd_ps(a2, a3);
        __m256 h = _mm256_hadd_ps(h01, h23);
        __m128 sa = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        _mm_storeu_ps(S + r * W + j, _mm_mul_ps(sa, _mm_set1_ps(scale)));
        if (two) {
          h01 = _mm256_hadd_ps(b0, b1); h23 = _mm256_hadd_ps(b2, b3);
          h = _mm256_hadd_ps(h01, h23);
          __m128 sb = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
          _mm_storeu_ps(S + (r + 1) * W + j, _mm_mul_ps(sb, _mm_set1_ps(scale)));
        }
      }
      for (; j < j1; j++) {  // the last few keys
        const float *kj = kc + j * d;
        __m256 a = _mm256_setzero_ps(), b = a;
        for (int64_t c = 0; c < d; c += 8) {
          __m256 u = _mm256_loadu_ps(kj + c);
          a = _mm256_fmadd_ps(_mm256_loadu_ps(qa + c), u, a);
          b = _mm256_fmadd_ps(_mm256_loadu_ps(qb + c), u, b);
        }
        S[r * W + j] = scale * hsum(a);
        if (two) S[(r + 1) * W + j] = scale * hsum(b);
      }
    }
  }
}

// O (M x dv) = P (M x W, row stride W) @ vc (W x dv); two rows and 32 output channels at a
// time: per key, two broadcasts and four loads feed eight FMAs. Keys in blocks of 64 (16 KB of
// V at dv = 64) so each block is read from memory once for all rows.
static void decode_values(const float *P, const float *vc, float *O, int64_t M, int64_t W,
                          int64_t dv) {
  for (int64_t j0 = 0; j0 < W; j0 += 64) {
    int64_t j1 = j0 + 64 < W ? j0 + 64 : W;
    for (int64_t r = 0; r < M; r += 2) {
      const int two = r + 1 < M;
      const float *pa = P + r * W, *pb = two ? pa + W : pa;
      for (int64_t c = 0; c < dv; c += 32) {
        float *oa = O + r * dv + c, *ob = two ? oa + dv : oa;
        __m256 a0, a1, a2, a3, b0, b1, b2, b3;
        if (j0 == 0) {
          a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = _mm256_setzero_ps();
        } else {
          a0 = _mm256_loadu_ps(oa); a1 = _mm256_loadu_ps(oa + 8);
          a2 = _mm256_loadu_ps(oa + 16); a3 = _mm256_loadu_ps(oa + 24);
          b0 = _mm256_loadu_ps(ob); b1 = _mm256_loadu_ps(ob + 8);
          b2 = _mm256_loadu_ps(ob + 16); b3 = _mm256_loadu_ps(ob + 24);
        }
        for (int64_t j = j0; j < j1; j++) {
          const float *vj = vc + j * dv + c;
          __m256 x = _mm256_broadcast_ss(pa + j), y = _mm256_broadcast_ss(pb + j);
          __m256 u = _mm256_loadu_ps(vj);
          a0 = _mm256_fmadd_ps(x, u, a0); b0 = _mm256_fmadd_ps(y, u, b0);
          u = _mm256_loadu_ps(vj + 8);
          a1 = _mm256_fmadd_ps(x, u, a1); b1 = _mm256_fmadd_ps(y, u, b1);
          u = _mm256_loadu_ps(vj + 16);
          a2 = _mm256_fmadd_ps(x, u, a2); b2 = _mm256_fmadd_ps(y, u, b2);
          u = _mm256_loadu_ps(vj + 24);
          a3 = _mm256_fmadd_ps(x, u, a3); b3 = _mm256_fmadd_ps(y, u, b3);
        }
        // a single last row computes b = a: store it first so a's store wins
        if (two) {
          _mm256_storeu_ps(ob, b0); _mm256_storeu_ps(ob + 8, b1);
          _mm256_storeu_ps(ob + 16, b2); _mm256_storeu_ps(ob + 24, b3);
        }
        _mm256_storeu_ps(oa, a0); _mm256_storeu_ps(oa + 8, a1);
        _mm256_storeu_ps(oa + 16, a2); _mm256_storeu_ps(oa + 24, a3);
      }
    }
  }
}
#endif

typedef struct {
  const float *q, *k, *v; float *opart, *mpart, *lpart;
  int64_t M, Lk, d, dv, ks, vs, nsplit, chunk;
  float scale;
  sgemm_t gemm; setthreads_t setthreads;
} djob_t;

static void decode_worker(team_t *TM) {
  const djob_t *J = (const djob_t *)TM->arg;
  float *S = (float *)malloc(sizeof(float) * J->M * J->chunk);
  if (!S) return;  // items left to the other threads (team_run reports any not done)
  if (J->setthreads) J->setthreads(1);
  const float one = 1.f, zero = 0.f; const char T = 'T', N = 'N';
  float scale = J->scale;
  int64_t start, stop;
  while (team_next(TM, &start, &stop)) {
    for (int64_t it = start; it < stop; it++) {
      int64_t bh = it / J->nsplit, sp = it % J->nsplit;
      int64_t j0 = sp * J->chunk, j1 = j0 + J->chunk < J->Lk ? j0 + J->chunk : J->Lk;
      float *op = J->opart + it * J->M * J->dv, *mp = J->mpart + it * J->M,
            *lp = J->lpart + it * J->M;
      if (j1 <= j0) {
        memset(op, 0, sizeof(float) * J->M * J->dv);
        for (int64_t r = 0; r < J->M; r++) { mp[r] = -INFINITY; lp[r] = 0.f; }
        continue;
      }
      int W = (int)(j1 - j0), Mi = (int)J->M, D = (int)J->d, DV = (int)J->dv;
      const float *qp = J->q + bh * J->M * J->d;
      const float *kp = J->k + bh * J->ks + j0 * J->d, *vp = J->v + bh * J->vs + j0 * J->dv;
#if defined(__AVX2__) && !defined(ATTNKIT_DECODE_SGEMM)
      const int own = J->d % 8 == 0 && J->dv % 32 == 0;
      if (own)
        decode_scores(qp, kp, S, J->M, W, J->d, J->scale);
      else
#endif
      J->gemm(&T, &N, &W, &Mi, &D, &scale, kp, &D, qp, &D, &zero, S, &W);  // S (M x W)
      for (int64_t r = 0; r < J->M; r++) {
        float m, sum = exp_shifted(S + r * W, W, &m);
        mp[r] = m; lp[r] = sum;
      }
#if defined(__AVX2__) && !defined(ATTNKIT_DECODE_SGEMM)
      if (own)
        decode_values(S, vp, op, J->M, W, J->dv);
      else
#endif
      J->gemm(&N, &N, &DV, &Mi, &W, &one, vp, &DV, S, &W, &zero, op, &DV);  // O (M x dv)
    }
  team_done(TM, stop - start);
  }
  free(S);
  if (J->setthreads) J->setthreads(0);
}

// ptr: q, k, v, out, lse. geo: D_* slots. Scores are scale * q.k.
int decode_forward(const int64_t *ptr, const int64_t *geo, double scale_, int nthreads,
                   void *const *rt) {
  const float *q = (const float *)ptr[0], *k = (const float *)ptr[1], *v = (const float *)ptr[2];
  float *out = (float *)ptr[3], *lse = (float *)ptr[4], scale = (float)scale_;
  int64_t BH = geo[D_BH], M = geo[D_M], Lk = geo[D_LK], d = geo[D_D], dv = geo[D_DV];
  int64_t ks = geo[D_KS], vs = geo[D_VS], nsplit = geo[D_NSPLIT];
  if (nsplit < 1) nsplit = decode_split(nthreads, BH, Lk);
  int64_t chunk = (Lk + nsplit - 1) / nsplit, total = BH * nsplit;
  if (chunk < 1) chunk = 1;
  float *opart = (float *)malloc(sizeof(float) * total * M * dv);
  float *mpart = (float *)malloc(sizeof(float) * total * M);
  float *lpart = (float *)malloc(sizeof(float) * total * M);
  if (!opart || !mpart || !lpart) { free(opart); free(mpart); free(lpart); return -1; }
  djob_t J = {q, k, v, opart, mpart, lpart, M, Lk, d, dv, ks, vs, nsplit, chunk, scale,
              (sgemm_t)rt[RT_SGEMM], (setthreads_t)rt[RT_SET_BLAS_THREADS]};
  int err = team_run(decode_worker, &J, total, nthreads, rt[RT_OMP_PARALLEL]);
  if (!err) {
    // merge the chunks of each (head, row): out = sum_s e^(m_s - m) O_s / sum_s e^(m_s - m) l_s
    for (int64_t bh = 0; bh < BH; bh++)
      for (int64_t r = 0; r < M; r++) {
        float m = -INFINITY;
        int nan = 0;  // a NaN score in any chunk makes the row NaN, as dense softmax does
        for (int64_t s = 0; s < nsplit; s++) {
          float ms = mpart[(bh * nsplit + s) * M + r];
          nan |= ms != ms;
          m = ms > m ? ms : m;
        }
        float *o = out + (bh * M + r) * dv;
        memset(o, 0, sizeof(float) * dv);
        float l = 0.f;
        if (m != -INFINITY)
          for (int64_t s = 0; s < nsplit; s++) {
            int64_t it = bh * nsplit + s;
            float w = expf(mpart[it * M + r] - m);
            l += w * lpart[it * M + r];
            const float *os = opart + (it * M + r) * dv;
            for (int64_t c = 0; c < dv; c++) o[c] += w * os[c];
          }
        if (nan || l != l) {
          for (int64_t c = 0; c < dv; c++) o[c] = NAN;
          lse[bh * M + r] = NAN;
        } else if (l > 0.f) {
          float inv = 1.f / l;
          for (int64_t c = 0; c < dv; c++) o[c] *= inv;
          lse[bh * M + r] = m + logf(l);
        } else {
          lse[bh * M + r] = -INFINITY;
        }
      }
  }
  free(opart); free(mpart); free(lpart);
  return err ? -1 : 0;
}

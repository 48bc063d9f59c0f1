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

#ifdef __AVX512F__
// With AVX-512 (same conditions as the AVX2 products, and d % 16 == 0 for the scores). Scores
// for five or more rows (a group's query heads): keys in lanes. A tile of 32 keys is transposed
// once (d x 32) and then feeds every row: per channel, two loads and one broadcast per row feed
// two FMAs per row, with no horizontal sums. Rows go in balanced blocks of at most 12 (24
// accumulators). The transposition costs about as much as the FMAs of four rows, so fewer rows
// take dot products in blocks of 16 with one transpose-add each (decode_scores_dots). Measured
// (Zen4, one thread, d = 64, 2048 keys; AVX2 products -> these): scores 68 -> 43 us at 12 rows,
// 24 -> 19 at 3, 13 -> 7 at 1; values 54 -> 30 at 12 rows, 11 -> 7 at 1.
#define DECODE_KT 32
// Keeps a loaded vector in a register: with few rows gcc folds the load into every FMA that
// uses it instead (one load per FMA, and the loads, not the FMAs, set the pace).
#define DECODE_IN_REGISTER(x) __asm__("" : "+v"(x))
// Keeps the loads before it ahead of those after it (a compiler barrier; no instruction).
#define DECODE_IN_ORDER() __asm__ __volatile__("" ::: "memory")

// dst (16 x 16, row stride ldd) = src (16 x 16, row stride lds) transposed
static inline void transpose16(const float *src, int64_t lds, float *dst, int64_t ldd) {
  __m512 r[16], t[16];
  _Pragma("GCC unroll 16")
  for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_ps(src + i * lds);
  _Pragma("GCC unroll 16")
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  _Pragma("GCC unroll 16")
  for (int i = 0; i < 16; i += 4) {
    __m512d a = _mm512_castps_pd(t[i]), b = _mm512_castps_pd(t[i + 1]);
    __m512d c = _mm512_castps_pd(t[i + 2]), e = _mm512_castps_pd(t[i + 3]);
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, e));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, e));
  }
  _Pragma("GCC unroll 16")
  for (int i = 0; i < 4; i++) {  // 128-bit lanes: rows i, i+4 and i+8, i+12
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
  }
  _Pragma("GCC unroll 16")
  for (int i = 0; i < 8; i++) {
    _mm512_storeu_ps(dst + i * ldd, _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88));
    _mm512_storeu_ps(dst + (i + 8) * ldd, _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd));
  }
}

// S rows [0, R) (row stride W), keys [j, j + n) of a tile kt (d x DECODE_KT, keys past n zero)
// next: the keys of the tile after this one (DECODE_KT * d floats, 2 d cache lines), prefetched
// two lines per channel, or NULL.
static inline __attribute__((always_inline)) void scores_tile(
    const float *q, const float *kt, float *S, int R, int64_t W, int64_t j, int n, int64_t d,
    float scale, const char *next) {
  __m512 a[12], b[12];
  _Pragma("GCC unroll 16")
  for (int r = 0; r < R; r++) a[r] = b[r] = _mm512_setzero_ps();
  for (int64_t c = 0; c < d; c++) {
    __m512 u = _mm512_loadu_ps(kt + c * DECODE_KT), w = _mm512_loadu_ps(kt + c * DECODE_KT + 16);
    DECODE_IN_REGISTER(u); DECODE_IN_REGISTER(w);
    if (next) {
      _mm_prefetch(next + 128 * c, _MM_HINT_T0);
      _mm_prefetch(next + 128 * c + 64, _MM_HINT_T0);
    }
    _Pragma("GCC unroll 16")
    for (int r = 0; r < R; r++) {
      __m512 x = _mm512_set1_ps(q[r * d + c]);
      a[r] = _mm512_fmadd_ps(x, u, a[r]);
      b[r] = _mm512_fmadd_ps(x, w, b[r]);
    }
  }
  __m512 s = _mm512_set1_ps(scale);
  __mmask16 ma = n >= 16 ? 0xffff : (__mmask16)((1u << n) - 1);
  __mmask16 mb = n >= 32 ? 0xffff : n <= 16 ? 0 : (__mmask16)((1u << (n - 16)) - 1);
  _Pragma("GCC unroll 16")
  for (int r = 0; r < R; r++) {
    _mm512_mask_storeu_ps(S + r * W + j, ma, _mm512_mul_ps(a[r], s));
    _mm512_mask_storeu_ps(S + r * W + j + 16, mb, _mm512_mul_ps(b[r], s));
  }
}

// S (M x W) = scale * q (M x d) @ kc (W x d)^T for d % 16 == 0; kt: d x DECODE_KT floats.
// The tile's transposition reads 16 keys' cache lines in turn (stride d floats), an order the
// hardware prefetchers do not follow: the first row block's FMAs prefetch the next tile in
// address order, spread over its channels (measured, Zen4, 12 rows, keys from memory: the
// attention of six layers 2.9-3.2x -> 2.2-2.5x the time of a plain read of the same bytes; the
// 768-wide multi-query decoding step ~4% faster, same-process A/B).
static void decode_scores16(const float *q, const float *kc, float *S, int64_t M, int64_t W,
                            int64_t d, float scale, float *kt) {
  int64_t nblk = (M + 11) / 12;
  for (int64_t j = 0; j < W; j += DECODE_KT) {
    int n = W - j < DECODE_KT ? (int)(W - j) : DECODE_KT;
    for (int h = 0; h < DECODE_KT; h += 16) {
      if (h + 16 <= n) {
        for (int64_t c = 0; c < d; c += 16)
          transpose16(kc + (j + h) * d + c, d, kt + c * DECODE_KT + h, DECODE_KT);
      } else {  // the last keys: scalar, zeros past the end
        for (int64_t c = 0; c < d; c++)
          _Pragma("GCC unroll 16")
          for (int i = 0; i < 16; i++)
            kt[c * DECODE_KT + h + i] = h + i < n ? kc[(j + h + i) * d + c] : 0.f;
      }
    }
    const char *next = j + 2 * DECODE_KT <= W ? (const char *)(kc + (j + DECODE_KT) * d) : NULL;
    for (int64_t b = 0, r0 = 0; b < nblk; b++) {
      int R = (int)((M - r0) / (nblk - b));  // balanced blocks: 12 -> 12, 13 -> 7 + 6
      const float *qr = q + r0 * d;
      float *Sr = S + r0 * W;
      const char *pf = b == 0 ? next : NULL;
      switch (R) {  // a constant row count for each, so the accumulators stay in registers
#define SC(k) case k: scores_tile(qr, kt, Sr, k, W, j, n, d, scale, pf); break;
        SC(1) SC(2) SC(3) SC(4) SC(5) SC(6) SC(7) SC(8) SC(9) SC(10) SC(11) SC(12)
#undef SC
      }
      r0 += R;
    }
  }
}

// Lane i of the result = the sum of a[i]'s 16 lanes (transpose-add: 30 shuffles, 15 adds)
static inline __m512 sum16x16(const __m512 *a) {
  __m512 b[8], c[4], d0, d1;
  for (int i = 0; i < 8; i++)  // per 128 bits: a2i, a2i+1, a2i, a2i+1
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]),
                         _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; i++) {  // per 128 bits: a4i .. a4i+3
    __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
    c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  d0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x44),
                     _mm512_shuffle_f32x4(c[0], c[1], 0xee));
  d1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x44),
                     _mm512_shuffle_f32x4(c[2], c[3], 0xee));
  return _mm512_add_ps(_mm512_shuffle_f32x4(d0, d1, 0x88), _mm512_shuffle_f32x4(d0, d1, 0xdd));
}

// a[t] = q * key j + t, channelwise (16 keys, D = 64 or 128 channels), key by key: each key's
// channels are read in one sequential pass and the query stays in registers. Without
// DECODE_IN_ORDER gcc interleaves the 16 keys' loads (key 1, key 8, key 3, ...), and the
// prefetchers fall behind on that order (measured, Zen4, one row per head, six layers' keys and
// values from memory: 1.15-1.32x -> 1.06-1.12x the time of a plain read of the same bytes; the
// 768-wide multi-head decoding step 4-10% faster, same-process A/B).
static inline __attribute__((always_inline)) void one_row_dots(const float *q,
                                                               const float *kc, int64_t j,
                                                               const int D, __m512 *a) {
  __m512 x[8];
  _Pragma("GCC unroll 8")
  for (int c = 0; c < D / 16; c++) {
    x[c] = _mm512_loadu_ps(q + 16 * c);
    DECODE_IN_REGISTER(x[c]);
  }
  _Pragma("GCC unroll 16")
  for (int t = 0; t < 16; t++) {
    const float *kr = kc + (j + t) * D;
    __m512 acc = _mm512_mul_ps(x[0], _mm512_loadu_ps(kr));
    _Pragma("GCC unroll 8")
    for (int c = 1; c < D / 16; c++) acc = _mm512_fmadd_ps(x[c], _mm512_loadu_ps(kr + 16 * c), acc);
    a[t] = acc;
    DECODE_IN_ORDER();
  }
}

// S rows [0, R) (row stride W), keys [j, j + 16 / R): R * (16 / R) dot products of d (% 16)
static inline __attribute__((always_inline)) void scores_dots(
    const float *q, const float *kc, float *S, int R, int64_t W, int64_t j, int64_t d,
    __m512 scale) {
  const int K = 16 / R;
  __m512 a[16];
  _Pragma("GCC unroll 16")
  for (int i = 0; i < 16; i++) a[i] = _mm512_setzero_ps();
  // one row (multi-head decoding): key by key; the channel-major order below interleaves 16
  // keys' cache lines, which streamed K at ~0.6 of the rate of the values pass (Zen4, one
  // thread, one head's 2048 keys from memory: 35-45 -> 28-29 us)
  if (R == 1 && d == 64) one_row_dots(q, kc, j, 64, a);
  else if (R == 1 && d == 128) one_row_dots(q, kc, j, 128, a);
  else
  for (int64_t c = 0; c < d; c += 16) {
    __m512 x[4];
    _Pragma("GCC unroll 16")
    for (int r = 0; r < R; r++) {
      x[r] = _mm512_loadu_ps(q + r * d + c);
      DECODE_IN_REGISTER(x[r]);
    }
    _Pragma("GCC unroll 16")
    for (int t = 0; t < K; t++) {
      __m512 u = _mm512_loadu_ps(kc + (j + t) * d + c);
      _Pragma("GCC unroll 16")
      for (int r = 0; r < R; r++) a[r * K + t] = _mm512_fmadd_ps(x[r], u, a[r * K + t]);
    }
  }
  __m512 e = _mm512_mul_ps(sum16x16(a), scale);
  if (R == 1) {
    _mm512_storeu_ps(S + j, e);
  } else if (R == 2) {
    _mm256_storeu_ps(S + j, _mm512_castps512_ps256(e));
    _mm256_storeu_ps(S + W + j, lane_hi(e));
  } else {
    _mm_storeu_ps(S + j, _mm512_castps512_ps128(e));
    _mm_storeu_ps(S + W + j, _mm512_extractf32x4_ps(e, 1));
    _mm_storeu_ps(S + 2 * W + j, _mm512_extractf32x4_ps(e, 2));
    _mm_storeu_ps(S + 3 * W + j, _mm512_extractf32x4_ps(e, 3));
  }
}

// S (M x W) = scale * q (M x d) @ kc (W x d)^T for d % 16 == 0 and few rows: dot products in
// blocks of 16 (4 rows x 4 keys, 2 x 8 or 1 x 16), each block's sums in one transpose-add.
// Keys in blocks of 64 (16 KB at d = 64) stay in L1 for all rows.
static void decode_scores_dots(const float *q, const float *kc, float *S, int64_t M, int64_t W,
                               int64_t d, float scale) {
  __m512 s = _mm512_set1_ps(scale);
  for (int64_t j0 = 0; j0 < W; j0 += 64) {
    int64_t j1 = j0 + 64 < W ? j0 + 64 : W;
    for (int64_t r = 0; r < M; ) {
      int R = M - r >= 4 ? 4 : M - r >= 2 ? 2 : 1, K = 16 / R;
      const float *qr = q + r * d;
      float *Sr = S + r * W;
      int64_t j = j0;
      for (; j + K <= j1; j += K) {
        if (R == 4) scores_dots(qr, kc, Sr, 4, W, j, d, s);
        else if (R == 2) scores_dots(qr, kc, Sr, 2, W, j, d, s);
        else scores_dots(qr, kc, Sr, 1, W, j, d, s);
      }
      for (; j < j1; j++)  // the last few keys
        for (int i = 0; i < R; i++) {
          __m512 a = _mm512_setzero_ps();
          for (int64_t c = 0; c < d; c += 16)
            a = _mm512_fmadd_ps(_mm512_loadu_ps(qr + i * d + c), _mm512_loadu_ps(kc + j * d + c),
                                a);
          Sr[i * W + j] = scale * _mm512_reduce_add_ps(a);
        }
      r += R;
    }
  }
}

// O rows [0, R) += P rows (row stride W) [j0, j1) @ vc, channels [c, c + 16 NC)
static inline __attribute__((always_inline)) void values_tile(
    const float *P, const float *vc, float *O, int R, int NC, int64_t W, int64_t j0, int64_t j1,
    int64_t dv, int64_t c, int first) {
  __m512 a[6][4];
  _Pragma("GCC unroll 16")
  for (int r = 0; r < R; r++)
    _Pragma("GCC unroll 16")
    for (int i = 0; i < NC; i++)
      a[r][i] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(O + r * dv + c + 16 * i);
  for (int64_t j = j0; j < j1; j++) {
    __m512 u[4];
    _Pragma("GCC unroll 16")
    for (int i = 0; i < NC; i++) {
      u[i] = _mm512_loadu_ps(vc + j * dv + c + 16 * i);
      DECODE_IN_REGISTER(u[i]);
    }
    _Pragma("GCC unroll 16")
    for (int r = 0; r < R; r++) {
      __m512 x = _mm512_set1_ps(P[r * W + j]);
      _Pragma("GCC unroll 16")
      for (int i = 0; i < NC; i++) a[r][i] = _mm512_fmadd_ps(x, u[i], a[r][i]);
    }
  }
  _Pragma("GCC unroll 16")
  for (int r = 0; r < R; r++)
    _Pragma("GCC unroll 16")
    for (int i = 0; i < NC; i++) _mm512_storeu_ps(O + r * dv + c + 16 * i, a[r][i]);
}

// O (M x dv) = P (M x W) @ vc (W x dv) for dv % 16 == 0: up to six rows and 64 channels at a
// time (per key, four loads and six broadcasts feed 24 FMAs); keys in blocks of 64, read from
// memory once for all rows.
static void decode_values16(const float *P, const float *vc, float *O, int64_t M, int64_t W,
                            int64_t dv) {
  int64_t nblk = (M + 5) / 6;
  for (int64_t j0 = 0; j0 < W; j0 += 64) {
    int64_t j1 = j0 + 64 < W ? j0 + 64 : W;
    for (int64_t b = 0, r0 = 0; b < nblk; b++) {
      int R = (int)((M - r0) / (nblk - b));
      for (int64_t c = 0; c < dv; ) {
        int NC = dv - c >= 64 ? 4 : (int)((dv - c) / 16);
        const float *Pr = P + r0 * W;
        float *Or = O + r0 * dv;
        int first = j0 == 0;
#define VT(r, k) case r * 8 + k: values_tile(Pr, vc, Or, r, k, W, j0, j1, dv, c, first); break;
#define VR(r) VT(r, 1) VT(r, 2) VT(r, 3) VT(r, 4)
        switch (R * 8 + NC) { VR(1) VR(2) VR(3) VR(4) VR(5) VR(6) }
#undef VR
#undef VT
        c += 16 * NC;
      }
      r0 += R;
    }
  }
}
#endif
#endif

typedef struct {
  const float *q, *k, *v; float *opart, *mpart, *lpart;
  int64_t M, Lk, d, dv, ks, vs, nsplit, chunk;
  float scale;
  sgemm_t gemm; setthreads_t setthreads;
} djob_t;

static void decode_worker(team_t *TM) {
  const djob_t *J = (const djob_t *)TM->arg;
  // S (M x chunk), then a tile of transposed keys for decode_scores16 (d x DECODE_KT), both on
  // 64-byte lines (the tile's 64-byte loads, and S's rows where chunk % 16 == 0, whole lines)
  int64_t ss = (J->M * J->chunk + 15) / 16 * 16;
  float *S = NULL;
  if (posix_memalign((void **)&S, 64, sizeof(float) * (ss + 32 * J->d)))
    return;  // items left to the other threads (team_run reports any not done)
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
#ifdef __AVX512F__
      // the key tile's transposition pays from five rows on (fewer: blocks of dot products)
      if (own && J->M >= 5 && J->d % 16 == 0)
        decode_scores16(qp, kp, S, J->M, W, J->d, J->scale, S + ss);
      else if (own && J->d % 16 == 0)
        decode_scores_dots(qp, kp, S, J->M, W, J->d, J->scale);
      else
#endif
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
#ifdef __AVX512F__
      if (own)
        decode_values16(S, vp, op, J->M, W, J->dv);
      else
#endif
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

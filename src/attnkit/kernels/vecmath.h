// Vector helpers shared by band_cpu.c, decode_cpu.c and gemv_cpu.c: with AVX2, exp of 8 floats
// (the polynomial of PyTorch's exp_u20, relative error ~1e-7; exp512: the same for 16 floats
// where AVX-512F is there) and horizontal max / sum; everywhere, a softmax row's exp pass
// (exp_shifted: 16 at a time with AVX-512F, scalar without AVX2). native.py's build cache key
// covers this header.
#ifndef ATTNKIT_VECMATH_H
#define ATTNKIT_VECMATH_H
#include <math.h>
#include <stdint.h>
#ifdef __AVX2__
#include <immintrin.h>

// exp(x) = 2^n * e^r, n = round(x / ln2), |r| <= ln2 / 2: the polynomial for e^r (Horner, in
// the vector width's set1/fmadd) and the range, written once for exp256 and exp512
#define EXP_LO (-87.3365447f)
#define EXP_HI 88.7228394f
#define EXP_LOG2E 1.44269504f
#define EXP_LN2 0.693147181f
#define EXP_POLY(r, set1, fmadd)                                                            \
  fmadd(r, fmadd(r, fmadd(r, fmadd(r, fmadd(r, set1(0.00828929059f), set1(0.0418978221f)), \
                                   set1(0.166676521f)),                                   \
                         set1(0.499991506f)),                                             \
               set1(0.999999701f)),                                                       \
        set1(1.f))

static inline __m256 exp256(__m256 x) {
  const __m256 lo = _mm256_set1_ps(EXP_LO), hi = _mm256_set1_ps(EXP_HI);
  __m256 small = _mm256_cmp_ps(x, lo, _CMP_LT_OS);
  x = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(EXP_LOG2E),
                                              _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(EXP_LN2), x);
  __m256 p = EXP_POLY(r, _mm256_set1_ps, _mm256_fmadd_ps);
  __m256i n = _mm256_cvtps_epi32(_mm256_sub_ps(fx, _mm256_set1_ps(1.f)));
  __m256 pow2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23));
  pow2 = _mm256_blendv_ps(pow2, _mm256_setzero_ps(), small);
  return _mm256_mul_ps(_mm256_mul_ps(p, pow2), _mm256_set1_ps(2.f));
}

#ifdef __AVX512F__
// exp of 16 floats: exp256's polynomial, 2^n applied by scalef; 0 below -87.3 (and for -inf)
static inline __m512 exp512(__m512 x) {
  const __m512 lo = _mm512_set1_ps(EXP_LO), hi = _mm512_set1_ps(EXP_HI);
  __mmask16 small = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OS);
  x = _mm512_max_ps(_mm512_min_ps(x, hi), lo);
  __m512 fx = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(EXP_LOG2E),
                                                   _mm512_set1_ps(0.5f)),
                                   _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(EXP_LN2), x);
  __m512 p = EXP_POLY(r, _mm512_set1_ps, _mm512_fmadd_ps);
  return _mm512_maskz_scalef_ps((__mmask16)~small, p, fx);
}
#endif

#ifdef __AVX512F__
// the upper 8 floats of 16 (AVX-512F alone: no DQ's extractf32x8)
static inline __m256 lane_hi(__m512 v) {
  return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
}
#endif

static inline float hmax(__m256 v) {
  __m128 a = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_max_ps(a, _mm_movehl_ps(a, a));
  a = _mm_max_ss(a, _mm_shuffle_ps(a, a, 1));
  return _mm_cvtss_f32(a);
}

static inline float hsum(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  a = _mm_add_ss(a, _mm_shuffle_ps(a, a, 1));
  return _mm_cvtss_f32(a);
}
#endif

// x[0..n) <- exp(x - m) in place, m the largest x (returned in *max); returns their sum. fp32,
// vectorized where AVX2 is (then the scalar tail), for the kernels' softmax rows.
static inline float exp_shifted(float *x, int64_t n, float *max) {
  int64_t i = 0;
  float m = -INFINITY, sum = 0.f;
#ifdef __AVX2__
  __m256 vm = _mm256_set1_ps(-INFINITY);
#ifdef __AVX512F__  // 16 at a time first (the exp pass: ~1.7x faster than 8 at a time on Zen4)
  __m512 wm = _mm512_set1_ps(-INFINITY);
  for (; i + 16 <= n; i += 16) wm = _mm512_max_ps(wm, _mm512_loadu_ps(x + i));
  vm = _mm256_max_ps(_mm512_castps512_ps256(wm), lane_hi(wm));
#endif
  for (; i + 8 <= n; i += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(x + i));
  m = hmax(vm);
#endif
  for (; i < n; i++) m = x[i] > m ? x[i] : m;
  i = 0;
#ifdef __AVX2__
  __m256 vs = _mm256_setzero_ps(), vmm = _mm256_set1_ps(m);
#ifdef __AVX512F__
  __m512 ws = _mm512_setzero_ps(), wmm = _mm512_set1_ps(m);
  for (; i + 16 <= n; i += 16) {
    __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(x + i), wmm));
    _mm512_storeu_ps(x + i, e);
    ws = _mm512_add_ps(ws, e);
  }
  vs = _mm256_add_ps(_mm512_castps512_ps256(ws), lane_hi(ws));
#endif
  for (; i + 8 <= n; i += 8) {
    __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + i), vmm));
    _mm256_storeu_ps(x + i, e);
    vs = _mm256_add_ps(vs, e);
  }
  sum = hsum(vs);
#endif
  for (; i < n; i++) { float e = expf(x[i] - m); x[i] = e; sum += e; }
  *max = m;
  return sum;
}
#endif

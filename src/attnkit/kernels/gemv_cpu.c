// Matrix-vector products for decoding (loaded by attnkit/kernels/native.py via ctypes).
//
// y (R, O) = x (R, I) @ W (O, I)^T + bias (O,), for the few rows R of a decoding step, fp32,
// all contiguous. A step is bound by reading W from memory; a BLAS gemv reads it on one thread,
// here each thread of torch's OpenMP team streams its own contiguous block of W's rows, so the
// whole memory bandwidth is used. Four rows of W at a time share each load of x. With gelu set,
// y = GELU(y) (the exact erf form, as torch.nn.functional.gelu) is applied in the same pass.
#include <math.h>
#include <stdint.h>
#include <pthread.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

typedef void (*gomp_parallel_t)(void (*)(void *), void *, unsigned, unsigned);
typedef int (*thread_num_t)(void);

typedef struct {
  const float *x, *W, *bias; float *y;
  int64_t R, I, O;
  int nthreads, gelu;
  thread_num_t thread_num;
} gemv_t;

#ifdef __AVX2__
static inline float hsum(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  a = _mm_add_ss(a, _mm_shuffle_ps(a, a, 1));
  return _mm_cvtss_f32(a);
}
#endif

// y[r, o] for rows o in [o0, o1) of W and every row r of x. Each group of four rows of W is
// used for all rows of x while it sits in L1, so W is read from memory once.
static void gemv_block(const gemv_t *G, int64_t o0, int64_t o1) {
  const int64_t I = G->I, O = G->O;
  int64_t o = o0;
#ifdef __AVX2__
  for (; o + 4 <= o1; o += 4) {
    const float *w0 = G->W + o * I, *w1 = w0 + I, *w2 = w1 + I, *w3 = w2 + I;
    for (int64_t r = 0; r < G->R; r++) {
      const float *x = G->x + r * I;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      int64_t i = 0;
      for (; i + 8 <= I; i += 8) {
        __m256 xv = _mm256_loadu_ps(x + i);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + i), xv, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + i), xv, a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + i), xv, a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + i), xv, a3);
      }
      float s0 = hsum(a0), s1 = hsum(a1), s2 = hsum(a2), s3 = hsum(a3);
      for (; i < I; i++) {
        s0 += w0[i] * x[i]; s1 += w1[i] * x[i]; s2 += w2[i] * x[i]; s3 += w3[i] * x[i];
      }
      float *y = G->y + r * O + o;
      y[0] = s0; y[1] = s1; y[2] = s2; y[3] = s3;
    }
  }
#endif
  for (; o < o1; o++) {
    const float *w = G->W + o * I;
    for (int64_t r = 0; r < G->R; r++) {
      const float *x = G->x + r * I;
      float s = 0.f;
      for (int64_t i = 0; i < I; i++) s += w[i] * x[i];
      G->y[r * O + o] = s;
    }
  }
  if (G->bias)
    for (int64_t r = 0; r < G->R; r++)
      for (o = o0; o < o1; o++) G->y[r * O + o] += G->bias[o];
  if (G->gelu)
    for (int64_t r = 0; r < G->R; r++)
      for (o = o0; o < o1; o++) {
        float v = G->y[r * O + o];
        G->y[r * O + o] = 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
      }
}

static void gemv_thread(gemv_t *G, int t) {
  // contiguous blocks of W's rows, multiples of 4 so each thread keeps the 4-row inner loop
  int64_t quads = (G->O + 3) / 4;
  int64_t o0 = 4 * (quads * t / G->nthreads), o1 = 4 * (quads * (t + 1) / G->nthreads);
  if (o1 > G->O) o1 = G->O;
  if (o0 < o1) gemv_block(G, o0, o1);
}

static void team_worker(void *arg) {
  gemv_t *G = (gemv_t *)arg;
  gemv_thread(G, G->thread_num());
}

typedef struct { gemv_t *G; int t; } pth_arg_t;

static void *pthread_worker(void *arg) {
  pth_arg_t *a = (pth_arg_t *)arg;
  gemv_thread(a->G, a->t);
  return NULL;
}

int gemv_rows(const float *x, const float *W, const float *bias, float *y, int64_t R,
              int64_t I, int64_t O, int gelu, int nthreads, void *omp_parallel,
              void *omp_thread_num) {
  if (nthreads < 1) nthreads = 1;
  if (nthreads > 64) nthreads = 64;
  gemv_t G = {x, W, bias, y, R, I, O, nthreads, gelu, (thread_num_t)omp_thread_num};
  if (nthreads == 1) {
    gemv_thread(&G, 0);
  } else if (omp_parallel && omp_thread_num) {
    ((gomp_parallel_t)omp_parallel)(team_worker, &G, (unsigned)nthreads, 0);
  } else {
    pthread_t tid[64]; pth_arg_t args[64];
    int started = 1;
    for (; started < nthreads; started++) {
      args[started].G = &G; args[started].t = started;
      if (pthread_create(&tid[started], NULL, pthread_worker, &args[started])) break;
    }
    for (int t = started; t < nthreads; t++) gemv_thread(&G, t);
    gemv_thread(&G, 0);
    for (int t = 1; t < started; t++) pthread_join(tid[t], NULL);
  }
  return 0;
}

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
// Forward, per (batch, head, block of bq query rows). fp32 with AVX2 + FMA or AVX-512F: the
// block's rows in groups of LANES queries, one per vector lane (see "the fp32 forward's own
// loops" below); where the CPU has AMX (and geo's B_MXU allows it), D is 32 or 64 and Dv a
// multiple of 16, the two products of those loops run on the tile unit instead, each fp32
// operand split exactly into three bf16 parts (see HAVE_AMX), the keys packed for it once per
// thread as its blocks move along them. Otherwise (fp64, or no AVX2): one GEMM for the scores of the block's key
// window, a softmax over each row's contiguous key range in place (other entries of the row
// zeroed), one GEMM for the output. The log-sum-exp of each row is written for merging and
// backward. Rows [q0, q1) go to out (B, Hq, q1 - q0, dv) and lse (B, Hq, q1 - q0); a row with
// no key gives zeros and -inf. The build is -march=native (native.py), so the lane width is the
// compiling machine's.
//
// Backward recomputes the probabilities from q, k and the saved log-sum-exp (nothing of size
// L x window is kept between the passes), with dS = P * (dP - rowsum(P * dP) + dlse) (dlse: the
// gradient reaching the log-sum-exp when partial results were merged). A work item is one
// (batch, kv head, segment of query rows) with all query heads of the group, so the group's
// dk / dv are summed in the item's own buffer without atomics; the item stores the keys it owns
// and leaves the few keys its band reaches beyond them (at most hi - lo) in a halo buffer that
// is added once every item is done.
//
// Weights (band_weights) recompute each block's scores with the GEMM path's product and write row
// i's probabilities exp(s - lse_i) (lse: the final log-sum-exp, which may span other
// components too) as one contiguous run at values[bh, offs[i] .. offs[i] + n_i) of a caller's
// CSR buffer (optionally the keys at indices[offs[i] ..]); every run is bounds-checked. The
// forward can write the same runs as it goes, from its own probabilities; in a union it is given
// the other components' log-sum-exp per row and scales each run by the band's share of the row.
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
       B_KSH, B_VSB, B_VSH, B_DOSB, B_DOSH, B_NSEG, B_WCOLS, B_WSTR, B_WKEY0, B_WIDX, B_MXU,
       B_NGEO };  // B_MXU: 1 lets the fp32 forward use the tile matrix unit (see HAVE_AMX)

// The keys k0, k0 + 1, .., k0 + n - 1 into a CSR index buffer of `bytes`-wide integers (4 or
// 8, checked by the entry points) from slot off on.
static inline void put_keys(void *idx, int64_t bytes, int64_t off, int64_t k0, int64_t n) {
  if (bytes == 4) {
    int32_t *x = (int32_t *)idx + off;
    for (int64_t t = 0; t < n; t++) x[t] = (int32_t)(k0 + t);
  } else {
    int64_t *x = (int64_t *)idx + off;
    for (int64_t t = 0; t < n; t++) x[t] = k0 + t;
  }
}

// Whether a weights call's index buffer is usable: absent, or of 4- or 8-byte entries wide
// enough for every key it gets (key0 + Lk - 1).
static inline int index_width_ok(const void *idx, const int64_t *g) {
  if (!idx) return 1;
  if (g[B_WIDX] == 8) return 1;
  return g[B_WIDX] == 4 && g[B_WKEY0] >= 0 && g[B_WKEY0] + g[B_LK] - 1 <= INT32_MAX;
}

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

// The CSR layout of rows [q0, q0 + nq) of a union of the band [lo, hi] with other components
// whose pairs of these rows come as up to UNION_MAX_LISTS sorted lists of keys row * Lk + key
// (disjoint from each other and from the band): row i holds the others' keys below its band, the
// band's run, then the others' keys above it. Writes indptr[r] (the row's first slot, from nnz0
// on), offs[r] (its band run's first slot), the others' keys into indices and each list element's
// slot into its pos array. The rows are cut into `nblocks` contiguous blocks that the team lays
// out independently: a block starts at the slot that the band runs and the list keys of the rows
// before it fill (a binary search per list), so the first touch of a new buffer (its page
// faults, most of the time here) is spread over the threads. ptr: indptr (nq), offs (nq),
// indices (bound, of `ibytes`-wide integers: 4 or 8), nnz_out (1: the slots used after these
// rows, the next nnz0), then keys_j and pos_j per list; geo: nq, q0, Lq, Lk, lo, hi, nnz0, bound,
// nlists, nblocks, ibytes, n_0 .. n_{nlists-1}. Returns 0, -2 (a slot past bound), -3 (a list not sorted, a key in two
// lists, outside these rows, or on the band) or -4 (bad geo); with several errors, the one of
// the first block that has one.
#define UNION_MAX_LISTS 16

typedef struct {
  const int64_t *keys[UNION_MAX_LISTS];
  int64_t *pos[UNION_MAX_LISTS], n[UNION_MAX_LISTS];
  int64_t *indptr, *offs;
  void *indices;
  int64_t nq, q0, lk, delta, lo, hi, bound, nl, nblocks, w, ibytes;
  const int64_t *start_nnz, *start_at;  // per block (and one past the last): first slot, heads
  int *rc;                              // per block
} union_job_t;

static inline int64_t union_row0(const union_job_t *J, int64_t b) {
  return J->nq * b / J->nblocks;
}

// The band's run [*a, *e) of row i.
static inline void union_band(const union_job_t *J, int64_t i, int64_t *a, int64_t *e) {
  int64_t x = i + J->delta + J->lo, y = i + J->delta + J->hi + 1;
  x = x < 0 ? 0 : (x > J->lk ? J->lk : x);
  y = y < x ? x : (y > J->lk ? J->lk : y);
  *a = x; *e = y;
}

// Block b's rows, from its start state; it must end at the next block's (else the lists were
// not as promised).
static int union_block(const union_job_t *J, int64_t b) {
  int64_t nl = J->nl, w = J->w, nnz = J->start_nnz[b], at[UNION_MAX_LISTS];
  for (int64_t j = 0; j < nl; j++) at[j] = J->start_at[b * nl + j];
  for (int64_t r = union_row0(J, b); r < union_row0(J, b + 1); r++) {
    int64_t i = J->q0 + r, row0 = i * w, a, e;
    union_band(J, i, &a, &e);
    J->indptr[r] = nnz;
    int band_done = 0;
    int64_t last = row0 - 1;  // the row's last key placed: keys must rise across all lists
    for (;;) {  // the row's other keys in order: the smallest head of the lists in this row
      int64_t best = -1, key = 0;
      for (int64_t j = 0; j < nl; j++)
        if (at[j] < J->n[j] && J->keys[j][at[j]] < row0 + w &&
            (best < 0 || J->keys[j][at[j]] < key)) {
          best = j; key = J->keys[j][at[j]];
        }
      if (best < 0) break;
      int64_t col = key - row0;
      if (col < 0 || col >= J->lk || (col >= a && col < e) || key <= last) return -3;
      last = key;
      if (!band_done && col >= e) {  // past the band: its run goes first
        J->offs[r] = nnz; nnz += e - a; band_done = 1;
      }
      if (nnz >= J->bound) return -2;
      put_keys(J->indices, J->ibytes, nnz, col, 1);
      J->pos[best][at[best]++] = nnz++;
    }
    if (!band_done) { J->offs[r] = nnz; nnz += e - a; }
    if (nnz > J->bound) return -2;
  }
  if (nnz != J->start_nnz[b + 1]) return -3;
  for (int64_t j = 0; j < nl; j++)
    if (at[j] != J->start_at[(b + 1) * nl + j]) return -3;  // keys left, or taken twice
  return 0;
}

static void union_worker(team_t *T) {
  const union_job_t *J = (const union_job_t *)T->arg;
  int64_t start, stop;
  while (team_next(T, &start, &stop)) {
    for (int64_t b = start; b < stop; b++) J->rc[b] = union_block(J, b);
    team_done(T, stop - start);
  }
}

// The first index of sorted keys[0, n) that is >= x.
static int64_t lower_bound(const int64_t *keys, int64_t n, int64_t x) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    int64_t mid = lo + (hi - lo) / 2;
    if (keys[mid] < x) lo = mid + 1; else hi = mid;
  }
  return lo;
}

int band_union_layout(const int64_t *ptr, const int64_t *geo, double scale, int nthreads,
                      void *const *rt) {
  (void)scale;
  union_job_t J;
  J.nq = geo[0]; J.q0 = geo[1]; J.lk = geo[3]; J.lo = geo[4]; J.hi = geo[5];
  J.bound = geo[7]; J.nl = geo[8]; J.nblocks = geo[9]; J.ibytes = geo[10];
  int64_t lq = geo[2], nnz0 = geo[6];
  if (J.nq < 0 || J.q0 < 0 || J.q0 + J.nq > lq || J.lk < 0 || J.lo > J.hi || nnz0 < 0 ||
      J.nl < 0 || J.nl > UNION_MAX_LISTS || J.nblocks < 1 || J.nblocks > TEAM_MAX ||
      !(J.ibytes == 8 || (J.ibytes == 4 && J.lk - 1 <= INT32_MAX)))
    return -4;
  if (J.nblocks > J.nq) J.nblocks = J.nq > 0 ? J.nq : 1;
  J.indptr = (int64_t *)ptr[0]; J.offs = (int64_t *)ptr[1]; J.indices = (void *)ptr[2];
  int64_t *nnz_out = (int64_t *)ptr[3];
  for (int64_t j = 0; j < J.nl; j++) {
    J.keys[j] = (const int64_t *)ptr[4 + 2 * j]; J.pos[j] = (int64_t *)ptr[5 + 2 * j];
    J.n[j] = geo[11 + j];
    if (J.n[j] < 0) return -4;
  }
  J.delta = J.lk - lq; J.w = J.lk > 0 ? J.lk : 1;
  // each block's start: the slots of the rows before it (band runs and list keys below its
  // first row's keys), and each list's head there; the end state after the last block
  int64_t start_nnz[TEAM_MAX + 1], start_at[(TEAM_MAX + 1) * UNION_MAX_LISTS];
  int rc[TEAM_MAX];
  int64_t band = 0;
  for (int64_t b = 0; b <= J.nblocks; b++) {
    int64_t r0 = union_row0(&J, b), listed = 0;
    for (int64_t j = 0; j < J.nl; j++) {
      int64_t h = b == 0 ? 0 : b == J.nblocks ? J.n[j]
                                              : lower_bound(J.keys[j], J.n[j], (J.q0 + r0) * J.w);
      start_at[b * J.nl + j] = h;
      listed += h;
    }
    start_nnz[b] = nnz0 + band + listed;
    if (b < J.nblocks)
      for (int64_t r = r0; r < union_row0(&J, b + 1); r++) {
        int64_t a, e;
        union_band(&J, J.q0 + r, &a, &e);
        band += e - a;
      }
  }
  J.start_nnz = start_nnz; J.start_at = start_at; J.rc = rc;
  for (int64_t b = 0; b < J.nblocks; b++) rc[b] = -1;
  if (team_run(union_worker, &J, J.nblocks, nthreads, rt[RT_OMP_PARALLEL]) != 0) return -1;
  for (int64_t b = 0; b < J.nblocks; b++)
    if (rc[b] != 0) return rc[b];
  *nnz_out = start_nnz[J.nblocks];
  return 0;
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

// ---- the fp32 forward's own loops (AVX-512F: 16 lanes, AVX2 + FMA: 8; else the GEMM path)
//
// Measured on a Zen4 core (sliding_window(128), L = 2048, D = 64): the GEMM path spent ~85% of
// its time in sgemm calls too small for BLAS (packing and beta scaling ~20% of that), and a
// 64-row block's 320-key window computes 25% more pairs than the band has. Here one vector's
// lanes are LANES consecutive queries: the scores of the keys their bands reach (LANES - 1
// more than one band) come from broadcasting each key's entries against the queries'
// transposed block, the softmax runs down the lanes (max, exp, sum as vector ops), and the
// output is the probabilities broadcast against V's rows, so no operand but the LANES x D
// query block is repacked and any D works.
#if defined(__AVX512F__)
#define LANES 16
typedef __m512 vf_t;
#define V_LOAD _mm512_loadu_ps
#define V_STORE _mm512_storeu_ps
#define V_SET1 _mm512_set1_ps
#define V_FMA _mm512_fmadd_ps
#define V_MAX _mm512_max_ps
#define V_ADD _mm512_add_ps
#define V_SUB _mm512_sub_ps
#define V_MUL _mm512_mul_ps
#define V_DIV _mm512_div_ps
#define V_ZERO _mm512_setzero_ps
#define V_EXP exp512
#define QK_RJ 16  // keys (accumulators) per score tile
#define PV_CB 16  // output columns per tile
// x in lanes [l0, l1], -inf elsewhere
static inline vf_t v_keep(vf_t x, int64_t l0, int64_t l1) {
  if (l1 < 0 || l0 > LANES - 1 || l1 < l0) return V_SET1(-INFINITY);
  uint32_t hi = l1 >= LANES - 1 ? 0xFFFFu : (1u << (l1 + 1)) - 1u;
  uint32_t lo = l0 <= 0 ? 0xFFFFu : ~((1u << l0) - 1u);
  return _mm512_mask_blend_ps((__mmask16)(hi & lo), V_SET1(-INFINITY), x);
}
static inline vf_t v_select_pos(vf_t cond, vf_t a, vf_t b) {  // a where cond > 0, else b
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(cond, V_ZERO(), _CMP_GT_OQ), b, a);
}
static inline vf_t v_zero_if_neginf(vf_t m) {
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(m, V_SET1(-INFINITY), _CMP_EQ_OQ), m, V_ZERO());
}
// dst (16 x 16, rows ldd apart) = the transpose of src (rows lds apart): the query block into
// lanes and the output tile back into rows without 512 scalar loads and stores each
#define HAVE_TR16 1
static inline void tr16(const float *src, int64_t lds, float *dst, int64_t ldd) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_ps(src + i * lds);
  for (int i = 0; i < 8; i++) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; i++) {  // r[4i + k], 128-bit lane m: column 4m + k of rows 4i..4i+3
    __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    __m512d c = _mm512_castps_pd(t[4 * i + 2]), e = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, e));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, e));
  }
  for (int k = 0; k < 4; k++) {
    __m512 u0 = _mm512_shuffle_f32x4(r[k], r[4 + k], 0x88), u1 = _mm512_shuffle_f32x4(r[k], r[4 + k], 0xDD);
    __m512 u2 = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0x88);
    __m512 u3 = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0xDD);
    _mm512_storeu_ps(dst + k * ldd, _mm512_shuffle_f32x4(u0, u2, 0x88));
    _mm512_storeu_ps(dst + (4 + k) * ldd, _mm512_shuffle_f32x4(u1, u3, 0x88));
    _mm512_storeu_ps(dst + (8 + k) * ldd, _mm512_shuffle_f32x4(u0, u2, 0xDD));
    _mm512_storeu_ps(dst + (12 + k) * ldd, _mm512_shuffle_f32x4(u1, u3, 0xDD));
  }
}
#elif defined(__AVX2__) && defined(__FMA__)
#define LANES 8
typedef __m256 vf_t;
#define V_LOAD _mm256_loadu_ps
#define V_STORE _mm256_storeu_ps
#define V_SET1 _mm256_set1_ps
#define V_FMA _mm256_fmadd_ps
#define V_MAX _mm256_max_ps
#define V_ADD _mm256_add_ps
#define V_SUB _mm256_sub_ps
#define V_MUL _mm256_mul_ps
#define V_DIV _mm256_div_ps
#define V_ZERO _mm256_setzero_ps
#define V_EXP exp256
#define QK_RJ 12  // 16 ymm registers: 12 accumulators, the query vector, a broadcast
#define PV_CB 12
static inline vf_t v_keep(vf_t x, int64_t l0, int64_t l1) {
  if (l1 < 0 || l0 > LANES - 1 || l1 < l0) return V_SET1(-INFINITY);
  const __m256 iota = _mm256_setr_ps(0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f);
  __m256 a = _mm256_set1_ps((float)(l0 < 0 ? 0 : l0)), z = _mm256_set1_ps((float)(l1 > 7 ? 7 : l1));
  __m256 ok = _mm256_and_ps(_mm256_cmp_ps(iota, a, _CMP_GE_OQ), _mm256_cmp_ps(iota, z, _CMP_LE_OQ));
  return _mm256_blendv_ps(V_SET1(-INFINITY), x, ok);
}
static inline vf_t v_select_pos(vf_t cond, vf_t a, vf_t b) {
  return _mm256_blendv_ps(b, a, _mm256_cmp_ps(cond, V_ZERO(), _CMP_GT_OQ));
}
static inline vf_t v_zero_if_neginf(vf_t m) {
  return _mm256_blendv_ps(m, V_ZERO(), _mm256_cmp_ps(m, V_SET1(-INFINITY), _CMP_EQ_OQ));
}
#else
#define LANES 0
#endif
#ifndef HAVE_TR16
#define HAVE_TR16 0
static inline void tr16(const float *s, int64_t a, float *d, int64_t b) {  // never called
  (void)s; (void)a; (void)d; (void)b;
}
#endif
#if LANES
// Columns [0, cb) of an output tile in lanes (ot: column c's LANES lanes at ot + c * LANES)
// into nl rows dv apart (op: the tile's first column in row 0)
static inline void put_lanes(const float *ot, int cb, int64_t nl, float *op, int64_t dv) {
  if (HAVE_TR16 && cb == LANES && nl == LANES) tr16(ot, LANES, op, dv);
  else
    for (int64_t l = 0; l < nl; l++)
      for (int c = 0; c < cb; c++) op[l * dv + c] = ot[c * LANES + l];
}
#endif
// The fp32 forward's two products on AMX (the tile matrix unit of recent Xeons), as exact as
// the FMA path: each fp32 operand x is cut by truncation into three bf16 parts, x = hi + mid +
// lo exactly (8 significant bits each), and x * y is taken as the six part products down to
// 2^-16 of hi * hi (hi hi, hi mid, mid hi, hi lo, lo hi, mid mid; the three dropped are below
// 2^-22 of |x y|, fp32's own rounding is 2^-24). A part product is exact in fp32 and the unit
// adds them to its fp32 accumulator one at a time, rounding to nearest, the smallest first, so
// a score or an output carries fp32 rounding as the FMA path's do (the unit flushes subnormal
// parts to zero: differences below 1e-38). Its throughput is 16 FMA units', so the six
// products take ~40% of the FMA path's time.
#if defined(__AVX512F__) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && \
    defined(__x86_64__) && defined(__linux__) && !defined(ATTNKIT_NO_AMX)
#define HAVE_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
static int amx_granted = 0;
static pthread_once_t amx_once = PTHREAD_ONCE_INIT;
static void amx_request(void) {  // Linux gives a process the tiles' state only when asked
  amx_granted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                        18 /* XFEATURE_XTILEDATA */) == 0;
}
// The tile instructions with the memory they touch told to the compiler (GCC 12's intrinsics
// give tileloadd no memory operand at all and ldtilecfg only the config's first 8 bytes, so
// stores before them could be moved past them or dropped).
#define AMX_LOAD(t, base, stride)                                      \
  __asm__ volatile("tileloadd (%0,%1,1), %%tmm" #t ::"r"((const void *)(base)), \
                   "r"((long)(stride)) : "memory")
#define AMX_STORE(t, base, stride)                                     \
  __asm__ volatile("tilestored %%tmm" #t ", (%0,%1,1)" ::"r"((void *)(base)), \
                   "r"((long)(stride)) : "memory")
#define AMX_ZERO(t) __asm__ volatile("tilezero %%tmm" #t ::)
#define AMX_DP(c, a, b) __asm__ volatile("tdpbf16ps %%tmm" #b ", %%tmm" #a ", %%tmm" #c ::)
static int amx_usable(void) {
  pthread_once(&amx_once, amx_request);
  return amx_granted;
}
// every tile 16 rows of 64 bytes: a score or output tile (16 x 16 fp32), an operand (16 x 32
// bf16). Per thread, before its first tile instruction.
static void amx_configure(void) {
  struct {
    uint8_t palette, start, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
  } __attribute__((aligned(64))) c;
  memset(&c, 0, sizeof c);
  c.palette = 1;
  for (int t = 0; t < 8; t++) { c.colsb[t] = 64; c.rows[t] = 16; }
  __asm__ volatile("ldtilecfg %0" ::"m"(c));
}
// x = h + m + l exactly, each part a float whose low 16 bits are zero (a bf16 in its top half)
static inline void amx_split(__m512 x, __m512i *h, __m512i *m, __m512i *l) {
  const __m512i top = _mm512_set1_epi32((int)0xFFFF0000u);
  *h = _mm512_and_si512(_mm512_castps_si512(x), top);
  __m512 r = _mm512_sub_ps(x, _mm512_castsi512_ps(*h));
  *m = _mm512_and_si512(_mm512_castps_si512(r), top);
  *l = _mm512_and_si512(_mm512_castps_si512(_mm512_sub_ps(r, _mm512_castsi512_ps(*m))), top);
}
// the bf16 pairs (a[i], b[i]) of two rows of parts: the unit's operand layout for B, whose row
// r holds rows 2r and 2r + 1 of the K dimension side by side for each of the 16 columns
static inline __m512i amx_pair(__m512i a, __m512i b) {
  return _mm512_mask_blend_epi16((__mmask32)0xAAAAAAAAu, _mm512_srli_epi32(a, 16), b);
}
// Row r of the three part matrices in B layout (hi, mid, lo: 16 uint32 a row): the parts of
// rows a and b side by side
static inline void amx_put_pairs(uint32_t *hi, uint32_t *mid, uint32_t *lo, int64_t r, __m512 a,
                                 __m512 b) {
  __m512i ah, am, al, bh, bm, bl;
  amx_split(a, &ah, &am, &al);
  amx_split(b, &bh, &bm, &bl);
  _mm512_storeu_si512(hi + 16 * r, amx_pair(ah, bh));
  _mm512_storeu_si512(mid + 16 * r, amx_pair(am, bm));
  _mm512_storeu_si512(lo + 16 * r, amx_pair(al, bl));
}
// Rows [0, n) (n even) of x (rows of 16 floats) as three part matrices in B layout: out[p]
// row r (16 uint32) = pairs of x's rows 2r, 2r + 1
static void amx_pairs(const float *x, int64_t n, uint32_t *hi, uint32_t *mid, uint32_t *lo) {
  for (int64_t r = 0; 2 * r < n; r++)
    amx_put_pairs(hi, mid, lo, r, _mm512_loadu_ps(x + 32 * r), _mm512_loadu_ps(x + 32 * r + 16));
}
// 16 floats' parts as 16 bf16 each
static inline void amx_store16(uint16_t *h, uint16_t *m, uint16_t *l, __m512 x) {
  __m512i a, b, c;
  amx_split(x, &a, &b, &c);
  _mm256_storeu_si256((__m256i *)h, _mm512_cvtepi32_epi16(_mm512_srli_epi32(a, 16)));
  _mm256_storeu_si256((__m256i *)m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(b, 16)));
  _mm256_storeu_si256((__m256i *)l, _mm512_cvtepi32_epi16(_mm512_srli_epi32(c, 16)));
}
// A thread's pack of the keys its blocks need, for the two products: a ring of chunks of 32
// keys (absolute key c * 32.. in slot c % nc), each K's tiles then V^T's (1 KB a tile, 16 rows
// of 64 bytes, read with unit stride): per 16 keys and 32 dims K's hi, mid, lo tiles (rows:
// keys), per 16 columns V^T's three (rows: columns, 32 keys). Blocks move forward through a
// head's keys, so each chunk is packed once per run of blocks, while it is in cache.
typedef struct {
  uint16_t *buf;
  int64_t nc, ns, ct, head, from, upto;  // slots; d / 32; dv / 16; its kv head, keys packed
} amx_ring_t;
static inline uint16_t *amx_ktile(const amx_ring_t *R, int64_t group) {  // group of 16 keys
  return R->buf + ((group / 2 % R->nc) * (2 * R->ns + R->ct) + group % 2 * R->ns) * 1536;
}
static inline uint16_t *amx_vtile(const amx_ring_t *R, int64_t chunk) {  // chunk of 32 keys
  return R->buf + ((chunk % R->nc) * (2 * R->ns + R->ct) + 2 * R->ns) * 1536;
}
// Chunk c of keys from kr / vr (rows d / dv apart; keys >= lk: zeros) into its slot
static void amx_pack_chunk(const amx_ring_t *R, int64_t c, const float *kr, const float *vr,
                           int64_t d, int64_t dv, int64_t lk) {
  float T[256] __attribute__((aligned(64)));
  for (int64_t half = 0; half < 2; half++) {
    uint16_t *kt = amx_ktile(R, 2 * c + half), *vt = amx_vtile(R, c) + 16 * half;
    int64_t j0 = 32 * c + 16 * half, n = lk - j0 < 16 ? (lk - j0 > 0 ? lk - j0 : 0) : 16;
    for (int64_t r = 0; r < 16; r++)  // K: row r of each 32 dims' tiles
      for (int64_t x = 0; x < d; x += 16) {
        uint16_t *o = kt + x / 32 * 1536 + r * 32 + x % 32;
        amx_store16(o, o + 512, o + 1024,
                    r < n ? _mm512_loadu_ps(kr + (j0 + r) * d + x) : _mm512_setzero_ps());
      }
    for (int64_t x = 0; x < dv; x += 16) {  // V^T: 16 columns x these 16 keys
      if (n == 16) tr16(vr + j0 * dv + x, dv, T, 16);
      else
        for (int64_t r = 0; r < 16; r++)
          for (int64_t j = 0; j < 16; j++) T[r * 16 + j] = j < n ? vr[(j0 + j) * dv + x + r] : 0.f;
      uint16_t *o = vt + x / 16 * 1536;
      for (int64_t r = 0; r < 16; r++)
        amx_store16(o + r * 32, o + 512 + r * 32, o + 1024 + r * 32, _mm512_load_ps(T + 16 * r));
    }
  }
}
// Keys [a, b) of kv head `head` packed (a: a multiple of 32); chunks before a may be dropped
static void amx_ensure(amx_ring_t *R, int64_t head, int64_t a, int64_t b, const float *kr,
                       const float *vr, int64_t d, int64_t dv, int64_t lk) {
  if (head != R->head || a < R->from || a > R->upto) {
    R->head = head;
    R->from = R->upto = a;
  }
  R->from = a;
  for (; R->upto < b; R->upto += 32) amx_pack_chunk(R, R->upto / 32, kr, vr, d, dv, lk);
}
// Q K^T: the scores of ntiles groups of 16 keys from group g0 against the query block's parts
// qb (B layout, d / 2 rows a part) into s (16 x 16 a tile, keys x lanes); tiles 1-3 hold the
// parts of the block's dims 0-31, 4-6 of dims 32-63, the keys' tiles pass through 7. (Same-
// machine timings: two score tiles in flight, 32 dims at a time with the sums reloaded, was
// 10% slower.)
#define AMX_QK_STEP(s, TH, TM, TL) \
  AMX_LOAD(7, kt + (s) * 1536 + 1024, 64); \
  AMX_DP(0, 7, TH);                        \
  AMX_LOAD(7, kt + (s) * 1536 + 512, 64);  \
  AMX_DP(0, 7, TM);                        \
  AMX_DP(0, 7, TH);                        \
  AMX_LOAD(7, kt + (s) * 1536, 64);        \
  AMX_DP(0, 7, TL);                        \
  AMX_DP(0, 7, TM);                        \
  AMX_DP(0, 7, TH);
// Tile u of the score tiles s (16 keys a tile from the group boundary; key row j of the block
// is tile row j + lead, n keys): its rows masked to the band (key j is allowed for lanes
// [jrel + j - hi, jrel + j - lo]), the lanes' max over the tile into tm[u] (and *vmax), and the
// rows replaced by exp(x - tm[u]) (exp(x) where tm[u] is -inf: zeros). The softmax's exps are
// taken here, tile by tile, where the tile unit's work on the next tile hides them; the final
// max is applied as one factor per tile (amx_prob_chunk).
static inline void amx_tile_exp(float *s, int64_t u, int64_t lead, int64_t n, int64_t jrel,
                                int64_t lo, int64_t hi, __m512 *tm, __m512 *vmax) {
  int64_t i0 = 16 * u < lead ? lead : 16 * u, i1 = 16 * u + 16 > lead + n ? lead + n : 16 * u + 16;
  __m512 m0 = _mm512_set1_ps(-INFINITY), m1 = m0;
  for (int64_t i = i0; i < i1; i++) {
    int64_t t = jrel + i - lead;
    __m512 x = _mm512_loadu_ps(s + 16 * i);
    if (t - hi > 0 || t - lo < 15) {
      x = v_keep(x, t - hi, t - lo);
      _mm512_storeu_ps(s + 16 * i, x);
    }
    if (i & 1) m1 = _mm512_max_ps(m1, x);
    else m0 = _mm512_max_ps(m0, x);
  }
  m0 = _mm512_max_ps(m0, m1);
  tm[u] = m0;
  *vmax = _mm512_max_ps(*vmax, m0);
  m0 = v_zero_if_neginf(m0);
  for (int64_t i = i0; i < i1; i++)
    _mm512_storeu_ps(s + 16 * i, exp512(_mm512_sub_ps(_mm512_loadu_ps(s + 16 * i), m0)));
}
// Q K^T into the score tiles s (see amx_tile_exp) for the groups of 16 keys from g0 on, against
// the query block's parts qb (B layout, d / 2 rows a part); tiles 1-3 hold the parts of the
// block's dims 0-31, 4-6 of dims 32-63, the keys' tiles pass through 7. While the tile unit
// computes a tile, the vector units finish the one before (amx_tile_exp).
static void amx_qk(const amx_ring_t *R, int64_t g0, int64_t d, const uint32_t *qb, float *s,
                   int64_t lead, int64_t n, int64_t jrel, int64_t lo, int64_t hi, __m512 *tm,
                   __m512 *vmax) {
  int64_t ntiles = (n + lead + 15) / 16;
  AMX_LOAD(1, qb, 64);
  AMX_LOAD(2, qb + 8 * d, 64);
  AMX_LOAD(3, qb + 16 * d, 64);
  if (d == 64) {
    AMX_LOAD(4, qb + 256, 64);
    AMX_LOAD(5, qb + 8 * d + 256, 64);
    AMX_LOAD(6, qb + 16 * d + 256, 64);
  }
  for (int64_t u = 0; u < ntiles; u++) {
    const uint16_t *kt = amx_ktile(R, g0 + u);
    AMX_ZERO(0);
    AMX_QK_STEP(0, 1, 2, 3)
    if (d == 64) { AMX_QK_STEP(1, 4, 5, 6) }
    AMX_STORE(0, s + 256 * u, 64);
    if (u) amx_tile_exp(s, u - 1, lead, n, jrel, lo, hi, tm, vmax);
  }
  amx_tile_exp(s, ntiles - 1, lead, n, jrel, lo, hi, tm, vmax);
}
// P V for 16 columns (output tile c, V^T's tiles through a): part products of the probabilities'
// parts (tiles 4-6) and V's, the smallest first
#define AMX_PV_PARTS(c, a, vt) \
  AMX_LOAD(a, (vt) + 1024, 64); \
  AMX_DP(c, a, 4);              \
  AMX_LOAD(a, (vt) + 512, 64);  \
  AMX_DP(c, a, 5);              \
  AMX_DP(c, a, 4);              \
  AMX_LOAD(a, (vt), 64);        \
  AMX_DP(c, a, 6);              \
  AMX_DP(c, a, 5);              \
  AMX_DP(c, a, 4);
// The probabilities of chunk t (rows 32t.. of x, amx_tile_exp's tiles from row off on, their
// factors f; rows outside [r0, r1) are no keys of the block): written back, added to *vsum, and
// as parts in B layout into pb's chunk t (parts 256 * nch apart)
static inline void amx_prob_chunk(float *x, int64_t t, int64_t r0, int64_t r1, int64_t off,
                                  const __m512 *f, __m512 *vsum, uint32_t *pb, int64_t nch) {
  uint32_t *hi = pb + 256 * t, *mid = hi + 256 * nch, *lo = mid + 256 * nch;
  for (int64_t r = 0; r < 16; r++) {
    int64_t i = 32 * t + 2 * r;
    __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
    if (i >= r0 && i < r1) {
      a = _mm512_mul_ps(_mm512_loadu_ps(x + 16 * i), f[(i - off) / 16]);
      _mm512_storeu_ps(x + 16 * i, a);
    }
    if (i + 1 >= r0 && i + 1 < r1) {
      b = _mm512_mul_ps(_mm512_loadu_ps(x + 16 * i + 16), f[(i + 1 - off) / 16]);
      _mm512_storeu_ps(x + 16 * i + 16, b);
    }
    *vsum = _mm512_add_ps(*vsum, _mm512_add_ps(a, b));
    amx_put_pairs(hi, mid, lo, r, a, b);
  }
}
// Softmax and P V of a block: x amx_qk's tiles seen from the 32-key boundary (its tile u at
// row off + 16u, maxes tm[u]; the block's keys rows [r0, r1); the lanes' max m), V from chunk
// ch0 of the ring. The probabilities exp(s - m) = exp(s - tm[u]) * exp(tm[u] - m) are written
// back to x; the lanes' sum goes to *vsum, 1 / sum (0 for a lane without mass) to *inv, and out
// rows (nl of them, dv apart) = P V * inv. 32 output columns at a time (tiles 0, 1, V through
// 7 and 3, so one loads while the other multiplies; four output tiles through one was 25%
// slower here); in the first pass the vector units make chunk t + 1's probabilities while the
// tile unit multiplies chunk t's. pb: room for nch chunks' parts; ot: 2 tiles; tm: overwritten.
static void amx_softmax_pv(const amx_ring_t *R, int64_t ch0, int64_t dv, float *x, int64_t r0,
                           int64_t r1, int64_t off, __m512 *tm, __m512 m, __m512 *vsum,
                           __m512 *inv, uint32_t *pb, int64_t nch, float *ot, float *op,
                           int64_t nl) {
  for (int64_t u = 0; u < (r1 - off + 15) / 16; u++) tm[u] = exp512(_mm512_sub_ps(tm[u], m));
  amx_prob_chunk(x, 0, r0, r1, off, tm, vsum, pb, nch);
  for (int64_t c0 = 0; c0 < dv; c0 += 32) {
    const int nc = dv - c0 >= 32 ? 2 : 1;
    AMX_ZERO(0);
    if (nc > 1) AMX_ZERO(1);
    for (int64_t t = 0; t < nch; t++) {
      const uint16_t *vt = amx_vtile(R, ch0 + t) + c0 / 16 * 1536;
      AMX_LOAD(4, pb + 256 * t, 64);
      AMX_LOAD(5, pb + 256 * (nch + t), 64);
      AMX_LOAD(6, pb + 256 * (2 * nch + t), 64);
      AMX_PV_PARTS(0, 7, vt)
      if (nc > 1) { AMX_PV_PARTS(1, 3, vt + 1536) }
      if (c0 == 0 && t + 1 < nch) amx_prob_chunk(x, t + 1, r0, r1, off, tm, vsum, pb, nch);
    }
    if (c0 == 0)
      *inv = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(*vsum, _mm512_setzero_ps(), _CMP_GT_OQ),
                                  _mm512_setzero_ps(), _mm512_div_ps(_mm512_set1_ps(1.f), *vsum));
    AMX_STORE(0, ot, 64);
    if (nc > 1) AMX_STORE(1, ot + 256, 64);
    for (int c = 0; c < nc; c++) {
      float *o = ot + 256 * c;
      for (int r = 0; r < 16; r++)
        _mm512_storeu_ps(o + 16 * r, _mm512_mul_ps(_mm512_loadu_ps(o + 16 * r), *inv));
      put_lanes(o, 16, nl, op + c0 + 16 * c, dv);
    }
  }
}
#else
#define HAVE_AMX 0
#endif

// 1 when the fp32 forward can run its products on AMX here (built for a CPU with it, and the
// process granted the tile state), else 0; reads no argument.
int band_matrix_unit(const int64_t *ptr, const int64_t *geo, double scale, int nthreads,
                     void *const *rt) {
  (void)ptr; (void)geo; (void)scale; (void)nthreads; (void)rt;
#if HAVE_AMX
  return amx_usable();
#else
  return 0;
#endif
}

#define BAND_BODY
#define LANE LANES
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
#undef LANE
#define LANE 0
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
  const int64_t *offs; void *idx; R *wout; int *bad;  // weights: CSR runs and a bounds flag
  const R *wlse;  // weights in a union: the other components' log-sum-exp per row, or NULL
  R qscale;        // the forward's factor on q (1 where the caller scaled it)
  int64_t nblocks, segblocks, nseg;  // backward: blocks per segment, segments per kv head
  GEMM_T gemm; setthreads_t setthreads;
  int amx;  // the fp32 forward's products on AMX (see HAVE_AMX)
} FN(job_t);

// softmax of s[a:b) in place (rest of the row zeroed); returns lse (-inf if empty)
static R FN(row_softmax)(R *s, int64_t W, int64_t a, int64_t b) {
  if (a >= b) { memset(s, 0, W * sizeof(R)); return -INFINITY; }
  if (a > 0) memset(s, 0, a * sizeof(R));
  if (b < W) memset(s + b, 0, (W - b) * sizeof(R));
  R *x = s + a; int64_t n = b - a, i = 0;
#if VEC
  R m, sum = exp_shifted(x, n, &m);
#else
  R m = -INFINITY, sum = 0;
  for (; i < n; i++) m = x[i] > m ? x[i] : m;
  for (i = 0; i < n; i++) { R e = EXP(x[i] - m); x[i] = e; sum += e; }
#endif
  R inv = 1.f / sum; i = 0;
#if VEC
  __m256 vi = _mm256_set1_ps(inv);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), vi));
#endif
  for (; i < n; i++) x[i] *= inv;
  return m + LOG(sum);
}

// The share of a row's mass on the band when the other components of a union hold log-mass lw:
// e^lb / (e^lb + e^lw) for the band's log-sum-exp lb (1 when lw = -inf; NaN stays NaN).
static R FN(band_share)(R lb, R lw) { return (R)1 / ((R)1 + EXP(lw - lb)); }

// Row i's run of n probabilities p (first key j) times f into the CSR buffer at offs[i] (and
// the keys, from the first head only); a run outside the buffer is skipped and flagged.
static void FN(put_run)(const FN(job_t) *J, int64_t bh, int64_t i, const R *p, int64_t n,
                        int64_t j, R f) {
  int64_t off = J->offs[i];
  if (off < 0 || off > J->g[B_WCOLS] - n) { __atomic_store_n(J->bad, 1, __ATOMIC_RELAXED); return; }
  R *w = J->wout + bh * J->g[B_WSTR] + off;
  if (f == (R)1) memcpy(w, p, n * sizeof(R));
  else for (int64_t t = 0; t < n; t++) w[t] = p[t] * f;
  if (J->idx && bh == 0) put_keys(J->idx, J->g[B_WIDX], off, J->g[B_WKEY0] + j, n);
}

// A block of the GEMM path (forward and weights): work item it is head bh = (b, h), query rows
// [i0, i1) (blocks of B_BQ from q0 on, up to q1) and their key window [j0, j1).
typedef struct { int64_t bh, b, hk, i0, i1, j0, j1; } FN(blk_t);

// The scores S^T (W x M, col-major, ld W) = K (W x d) * Q^T of block it (one BLAS call, the
// thread's own); 0 when no row of the block has a key (S untouched).
static int FN(block_scores)(const FN(job_t) *J, int64_t it, int64_t q0, int64_t q1, R *S,
                            FN(blk_t) *o) {
  const int64_t *g = J->g;
  int64_t Hq = g[B_HQ], blk = it % J->nblocks, bh = it / J->nblocks, h = bh % Hq;
  o->bh = bh; o->b = bh / Hq; o->hk = h / (Hq / g[B_HKV]);
  o->i0 = q0 + blk * g[B_BQ];
  o->i1 = o->i0 + g[B_BQ] < q1 ? o->i0 + g[B_BQ] : q1;
  window(g, o->i0, o->i1, &o->j0, &o->j1);
  if (o->j1 <= o->j0) return 0;
  const R alpha = J->qscale, zero = 0; const char T = 'T', N = 'N';
  int W = (int)(o->j1 - o->j0), M = (int)(o->i1 - o->i0), D = (int)g[B_D];
  const R *qp = J->q + o->b * g[B_QSB] + h * g[B_QSH] + o->i0 * g[B_D];
  const R *kp = J->k + o->b * g[B_KSB] + o->hk * g[B_KSH] + o->j0 * g[B_D];
  J->gemm(&T, &N, &W, &M, &D, &alpha, kp, &D, qp, &D, &zero, S, &W);
  return 1;
}

// A thread's score buffer for one block of the GEMM path (B_BQ rows by the widest window), its
// BLAS set to one thread; NULL when out of memory.
static R *FN(block_buffer)(const FN(job_t) *J) {
  int64_t w = J->g[B_BQ] + J->g[B_HI] - J->g[B_LO];
  R *S = (R *)malloc(sizeof(R) * J->g[B_BQ] * (w > 0 ? w : 1));
  if (S && J->setthreads) J->setthreads(1);
  return S;
}

__attribute__((unused)) static void FN(forward_worker)(team_t *TM) {
  const FN(job_t) *J = (const FN(job_t) *)TM->arg;
  const int64_t *g = J->g;
  int64_t q0 = g[B_Q0], q1 = g[B_Q1], dv = g[B_DV], nrows = q1 - q0;
  R *S = FN(block_buffer)(J);
  if (!S) return;  // items left to the other threads (team_run reports any not done)
  const R one = 1.f, zero = 0.f; const char N = 'N';
  int64_t start, stop;
  while (team_next(TM, &start, &stop)) {
    for (int64_t it = start; it < stop; it++) {
      FN(blk_t) o;
      int keys = FN(block_scores)(J, it, q0, q1, S, &o);
      int64_t bh = o.bh, i0 = o.i0, nq = o.i1 - o.i0, j0 = o.j0;
      R *op = J->out + (bh * nrows + (i0 - q0)) * dv;
      R *lp = J->lse_out + bh * nrows + (i0 - q0);
      if (!keys) {
        memset(op, 0, sizeof(R) * nq * dv);
        for (int64_t r = 0; r < nq; r++) lp[r] = -INFINITY;
        continue;
      }
      int W = (int)(o.j1 - j0), M = (int)nq, DV = (int)dv;
      const R *vp = J->v + o.b * g[B_VSB] + o.hk * g[B_VSH] + j0 * dv;
      for (int64_t r = 0; r < nq; r++) {
        int64_t a, e;
        row_band(g, i0 + r, j0, W, &a, &e);
        lp[r] = FN(row_softmax)(S + r * W, W, a, e);
        if (J->wout && e > a)
          FN(put_run)(J, bh, i0 + r - q0, S + r * W + a, e - a, j0 + a,
                      J->wlse ? FN(band_share)(lp[r], J->wlse[bh * nrows + i0 + r - q0]) : 1);
      }
      // O^T (DV x M, ld DV) = V^T (DV x W) * P^T (W x M)
      J->gemm(&N, &N, &DV, &M, &W, &one, vp, &DV, S, &W, &zero, op, &DV);
    }
    team_done(TM, stop - start);
  }
  free(S);
  if (J->setthreads) J->setthreads(0);  // back to the global MKL thread count
}

#if LANE
// Scores of the n keys from kr (rows d apart) against the transposed query block qt (d x LANES)
// into s (n x LANES), -inf where a lane's band excludes the key (key t of the run is allowed for
// lanes [jrel + t - hi, jrel + t - lo]); the lanes' running max in *vmax. d and the tile sizes
// are constants once inlined into the callers below (immediate offsets for the key rows).
static inline __attribute__((always_inline)) void qk_tile(const float *kr, int64_t d,
    const float *qt, float *s, int rj, int64_t jrel, int64_t lo, int64_t hi, vf_t *vmax) {
  vf_t acc[QK_RJ];
#pragma GCC unroll 16
  for (int r = 0; r < rj; r++) acc[r] = V_ZERO();
#pragma GCC unroll 2
  for (int64_t c = 0; c < d; c++) {
    vf_t qv = V_LOAD(qt + c * LANES);
#pragma GCC unroll 16
    for (int r = 0; r < rj; r++) acc[r] = V_FMA(V_SET1(kr[r * d + c]), qv, acc[r]);
  }
#pragma GCC unroll 16
  for (int r = 0; r < rj; r++) {
    int64_t t = jrel + r;
    vf_t x = acc[r];
    if (t - hi > 0 || t - lo < LANES - 1) x = v_keep(x, t - hi, t - lo);
    *vmax = V_MAX(*vmax, x);
    V_STORE(s + r * LANES, x);
  }
}

static inline __attribute__((always_inline)) void qk_run(const float *kr, int64_t d,
    const float *qt, float *s, int64_t n, int64_t jrel, int64_t lo, int64_t hi, vf_t *vmax) {
  int64_t j = 0;
  for (; j + QK_RJ <= n; j += QK_RJ)
    qk_tile(kr + j * d, d, qt, s + j * LANES, QK_RJ, jrel + j, lo, hi, vmax);
  for (; j + 4 <= n; j += 4) qk_tile(kr + j * d, d, qt, s + j * LANES, 4, jrel + j, lo, hi, vmax);
  for (; j < n; j++) qk_tile(kr + j * d, d, qt, s + j * LANES, 1, jrel + j, lo, hi, vmax);
}

// ot (cb x LANES) = columns [0, cb) of V's n rows from vr (dv apart) against p (n x LANES)
static inline __attribute__((always_inline)) void pv_tile(const float *vr, int64_t dv,
    const float *p, int64_t n, int cb, vf_t scale, float *ot) {
  vf_t acc[PV_CB];
#pragma GCC unroll 16
  for (int c = 0; c < cb; c++) acc[c] = V_ZERO();
#pragma GCC unroll 2
  for (int64_t j = 0; j < n; j++) {
    vf_t pv = V_LOAD(p + j * LANES);
    const float *x = vr + j * dv;
#pragma GCC unroll 16
    for (int c = 0; c < cb; c++) acc[c] = V_FMA(V_SET1(x[c]), pv, acc[c]);
  }
#pragma GCC unroll 16
  for (int c = 0; c < cb; c++) V_STORE(ot + c * LANES, V_MUL(acc[c], scale));
}

static inline __attribute__((always_inline)) void pv_run(const float *vr, int64_t dv,
    const float *p, int64_t n, vf_t scale, float *ot, float *op, int64_t nl) {
  int64_t c0 = 0;
  while (c0 < dv) {
    int cb;
    if (c0 + PV_CB <= dv) { cb = PV_CB; pv_tile(vr + c0, dv, p, n, PV_CB, scale, ot); }
    else if (c0 + 4 <= dv) { cb = 4; pv_tile(vr + c0, dv, p, n, 4, scale, ot); }
    else { cb = 1; pv_tile(vr + c0, dv, p, n, 1, scale, ot); }
    put_lanes(ot, cb, nl, op + c0, dv);
    c0 += cb;
  }
}

// Where row i's run of cnt probabilities (first key a) goes in the CSR buffer and the factor
// it is written with (the lane's 1 / sum, times the band's share of the row in a union); its
// keys are written from the first head. NULL (and the bounds flag set) for a run outside the
// buffer.
static float *FN(lane_run)(const FN(job_t) *J, int64_t bh, int64_t i, int64_t a, int64_t cnt,
                           float inv, float *f) {
  const int64_t *g = J->g;
  int64_t q0 = g[B_Q0], off = J->offs[i - q0];
  if (off < 0 || off > g[B_WCOLS] - cnt) {
    __atomic_store_n(J->bad, 1, __ATOMIC_RELAXED);
    return NULL;
  }
  *f = inv;
  if (J->wlse) {
    int64_t r = bh * (g[B_Q1] - q0) + i - q0;
    *f *= FN(band_share)(J->lse_out[r], J->wlse[r]);
  }
  if (J->idx && bh == 0) put_keys(J->idx, g[B_WIDX], off, g[B_WKEY0] + a, cnt);
  return J->wout + bh * g[B_WSTR] + off;
}

static void FN(lanes_worker)(team_t *TM) {
  const FN(job_t) *J = (const FN(job_t) *)TM->arg;
  const int64_t *g = J->g;
  int64_t Hq = g[B_HQ], grp = Hq / g[B_HKV], bq = g[B_BQ], lo = g[B_LO], hi = g[B_HI];
  int64_t q0 = g[B_Q0], q1 = g[B_Q1], d = g[B_D], dv = g[B_DV], nrows = q1 - q0;
  int64_t lk = g[B_LK], delta = lk - g[B_L], nmax = LANES + hi - lo;
  // scores / probabilities (nmax x LANES, whole tiles of 16 on AMX), then Q^T (d x LANES), out
  // tiles, the lanes' max and sum; on AMX the parts of Q^T and of the probabilities
  int64_t srows = nmax + 48, extra = 0;
#if HAVE_AMX
  const int amx = J->amx;
  // the ring holds every chunk of 32 keys a group of LANES queries reaches
  int64_t npairs = 16 * ((nmax + 31) / 32 + 1);
  amx_ring_t ring = {NULL, (nmax + 62) / 32 + 1, d / 32, dv / 16, -1, 0, 0};
  if (amx) {
    extra = 3 * (d / 2) * 16 + 3 * npairs * 16 + 16 * (srows / 16 + 1);
    if (posix_memalign((void **)&ring.buf, 64,
                       sizeof(uint16_t) * ring.nc * (2 * ring.ns + ring.ct) * 1536))
      return;
  }
#endif
  float *S0 = NULL;
  if (posix_memalign((void **)&S0, 64, sizeof(float) * (LANES * (srows + d + 64 + 2) + extra))) {
#if HAVE_AMX
    free(ring.buf);
#endif
    return;
  }
  // S from row 32 on: the AMX products start at the keys' 16 / 32 boundaries before the block's
  float *S = S0 + 32 * LANES, *QT = S0 + srows * LANES, *OT = QT + d * LANES;
  float *mx = OT + 64 * LANES, *sm = mx + LANES;
#if HAVE_AMX
  uint32_t *QB = (uint32_t *)(sm + LANES), *PB = QB + 3 * (d / 2) * 16;
  __m512 *TMX = (__m512 *)(PB + 3 * npairs * 16);  // amx_qk's maxes, one per tile
  if (amx) amx_configure();
#endif
  int64_t start, stop;
  while (team_next(TM, &start, &stop)) {
    for (int64_t it = start; it < stop; it++) {
      int64_t blk = it % J->nblocks, bh = it / J->nblocks;
      int64_t b = bh / Hq, h = bh % Hq, hk = h / grp;
      int64_t i0 = q0 + blk * bq, i1 = i0 + bq < q1 ? i0 + bq : q1;
      const float *qh = J->q + b * g[B_QSB] + h * g[B_QSH];
      const float *kh = J->k + b * g[B_KSB] + hk * g[B_KSH];
      const float *vh = J->v + b * g[B_VSB] + hk * g[B_VSH];
      float *oh = J->out + (b * Hq + h) * nrows * dv, *lh = J->lse_out + (b * Hq + h) * nrows;
      for (int64_t gi = i0; gi < i1; gi += LANES) {
        int64_t nl = i1 - gi < LANES ? i1 - gi : LANES;
        int64_t ka = gi + delta + lo, kb = gi + nl - 1 + delta + hi + 1;
        if (ka < 0) ka = 0;
        if (kb > lk) kb = lk;
        float *op = oh + (gi - q0) * dv;
        if (kb <= ka) {  // no key for any of these rows
          memset(op, 0, sizeof(float) * nl * dv);
          for (int64_t l = 0; l < nl; l++) lh[gi - q0 + l] = -INFINITY;
          continue;
        }
        int64_t n = kb - ka;
        int64_t c16 = 0;
        if (HAVE_TR16 && nl == LANES)
          for (; c16 + LANES <= d; c16 += LANES) tr16(qh + gi * d + c16, d, QT + c16 * LANES, LANES);
        if (nl < LANES) memset(QT, 0, sizeof(float) * d * LANES);
        for (int64_t l = 0; l < nl; l++) {
          const float *qr = qh + (gi + l) * d;
          for (int64_t c = c16; c < d; c++) QT[c * LANES + l] = qr[c];
        }
        if (J->qscale != 1.f) {  // the same product as the caller's q * scale, per element
          vf_t vs = V_SET1(J->qscale);
          for (int64_t c = 0; c < d; c++) V_STORE(QT + c * LANES, V_MUL(V_LOAD(QT + c * LANES), vs));
        }
        vf_t vmax = V_SET1(-INFINITY);
        int64_t jrel = ka - delta - gi;  // first key's offset from lane 0's query
#if HAVE_AMX
        if (amx) {  // whole groups of 16 keys, then the band's mask and the max
          int64_t lead = ka % 16;
          amx_ensure(&ring, bh / grp, ka - ka % 32, kb, kh, vh, d, dv, lk);
          amx_pairs(QT, d, QB, QB + 8 * d, QB + 16 * d);
          amx_qk(&ring, ka / 16, d, QB, S - lead * LANES, lead, n, jrel, lo, hi, TMX, &vmax);
        } else
#endif
        if (d == 64) qk_run(kh + ka * 64, 64, QT, S, n, jrel, lo, hi, &vmax);
        else qk_run(kh + ka * d, d, QT, S, n, jrel, lo, hi, &vmax);
        vf_t m = v_zero_if_neginf(vmax), vsum = V_ZERO(), inv = V_ZERO();
#if HAVE_AMX
        if (amx) {
          int64_t lead = ka % 32, nch = (n + lead + 31) / 32;
          amx_softmax_pv(&ring, ka / 32, dv, S - lead * LANES, lead, lead + n, lead - ka % 16, TMX,
                         m, &vsum, &inv, PB, nch, OT, op, nl);
        } else
#endif
        {
          for (int64_t j = 0; j < n; j++) {
            vf_t p = V_EXP(V_SUB(V_LOAD(S + j * LANES), m));
            V_STORE(S + j * LANES, p);
            vsum = V_ADD(vsum, p);
          }
          inv = v_select_pos(vsum, V_DIV(V_SET1(1.f), vsum), V_ZERO());
          if (dv == 64) pv_run(vh + ka * 64, 64, S, n, inv, OT, op, nl);
          else pv_run(vh + ka * dv, dv, S, n, inv, OT, op, nl);
        }
        V_STORE(mx, vmax);
        V_STORE(sm, vsum);
        V_STORE(OT, inv);
        for (int64_t l = 0; l < nl; l++)
          lh[gi - q0 + l] = sm[l] > 0.f ? mx[l] + logf(sm[l]) : -INFINITY;
        if (!J->wout) continue;
#if HAVE_TR16
        if (nl == LANES && ka == gi + delta + lo && kb == gi + LANES + delta + hi) {
          // every row's run unclipped: row l's is window rows [l, l + cnt) of lane l, so each
          // 16 x 16 tile of S is transposed and each lane's row stored at its run's slots
          // (masked at the run's ends) instead of gathered one probability at a time
          int64_t cnt = hi - lo + 1;
          float *wl[LANES], il[LANES], T[LANES * LANES] __attribute__((aligned(64)));
          for (int64_t l = 0; l < LANES; l++)
            wl[l] = FN(lane_run)(J, bh, gi + l, ka + l, cnt, OT[l], &il[l]);
          // (a last partial tile reads past S's n rows into the thread's own buffer, masked)
          for (int64_t jt = 0; jt < n; jt += LANES) {
            tr16(S + jt * LANES, LANES, T, LANES);
            for (int64_t l = 0; l < LANES; l++) {
              int64_t j0 = l - jt, j1 = l - jt + cnt;  // tile columns of row l's run
              if (!wl[l] || j1 <= 0 || j0 >= LANES) continue;
              uint32_t keep = (j1 >= LANES ? 0xFFFFu : (1u << j1) - 1u) &
                              (j0 <= 0 ? 0xFFFFu : ~((1u << j0) - 1u));
              _mm512_mask_storeu_ps(wl[l] + jt - l, (__mmask16)keep,
                                    V_MUL(V_LOAD(T + l * LANES), V_SET1(il[l])));
            }
          }
          continue;
        }
#endif
        for (int64_t l = 0; l < nl; l++) {  // row gi + l's probabilities as one CSR run
          int64_t i = gi + l, a = i + delta + lo, e = i + delta + hi + 1;
          if (a < 0) a = 0;
          if (e > lk) e = lk;
          if (e <= a) continue;
          float il, *w = FN(lane_run)(J, bh, i, a, e - a, OT[l], &il);
          if (w)
            for (int64_t j = a; j < e; j++) w[j - a] = S[(j - ka) * LANES + l] * il;
        }
      }
    }
    team_done(TM, stop - start);
  }
#if HAVE_AMX
  if (amx) __asm__ volatile("tilerelease" ::: "memory");
  free(ring.buf);
#endif
  free(S0);
}

#endif

// ptr: q, k, v, out, lse, then the optional weights output: values (B * Hq rows B_WSTR apart,
// B_WCOLS columns) or 0, offs (q1 - q0,), indices (B_WCOLS,) of B_WIDX-byte integers or 0, and
// wlse (B * Hq, q1 - q0) or 0; row i's probabilities go to values[bh, offs[i - q0] ..] and its
// keys (plus B_WKEY0) to indices. With wlse (the log-sum-exp of the other components of a
// union, per row) they are the union's weights exp(s - lse_row) instead of the band's own.
// geo: every B_* slot; scale: the scores are scale * q . k (1 for queries the caller scaled).
// Computes rows [q0, q1). Returns 0, -1 (out of memory), -2 (a run outside the buffer), -3 (an
// index width that is not 4 or 8 bytes, or too narrow for the keys) or -4 (a scale that is not
// finite).
int FN(band_forward)(const int64_t *ptr, const int64_t *geo, double scale, int nthreads,
                 void *const *rt) {
  if (!isfinite(scale)) return -4;
  FN(job_t) J;
  memset(&J, 0, sizeof J);
  J.qscale = (R)scale;
  int bad = 0;
  J.q = (const R *)ptr[0]; J.k = (const R *)ptr[1]; J.v = (const R *)ptr[2];
  J.out = (R *)ptr[3]; J.lse_out = (R *)ptr[4];
  J.wout = (R *)ptr[5]; J.offs = (const int64_t *)ptr[6]; J.idx = (void *)ptr[7];
  J.wlse = (const R *)ptr[8];
  if (!index_width_ok(J.idx, geo)) return -3;
  J.bad = &bad;
  J.g = geo;
  J.nblocks = (geo[B_Q1] - geo[B_Q0] + geo[B_BQ] - 1) / geo[B_BQ];
  J.gemm = (GEMM_T)rt[RT_GEMM]; J.setthreads = (setthreads_t)rt[RT_SET_BLAS_THREADS];
  // blocks are independent (each reads its own rows and key window): small chunks, so a
  // preempted thread's rest goes to the others
#if LANE && HAVE_AMX
  J.amx = geo[B_MXU] && (geo[B_D] == 32 || geo[B_D] == 64) && geo[B_DV] > 0 &&
          geo[B_DV] % 16 == 0 && amx_usable();
#endif
#if LANE
  void (*worker)(team_t *) = FN(lanes_worker);
#else
  void (*worker)(team_t *) = FN(forward_worker);
#endif
  int err = team_run_shares(worker, &J, geo[B_B] * geo[B_HQ] * J.nblocks, nthreads, 4,
                            rt[RT_OMP_PARALLEL]);
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
  int64_t L = g[B_L], ncol = g[B_WCOLS], wstr = g[B_WSTR];
  R *S = FN(block_buffer)(J);
  if (!S) return;  // items left to the other threads (team_run reports any not done)
  int64_t start, stop;
  while (team_next(TM, &start, &stop)) {
    for (int64_t it = start; it < stop; it++) {
      FN(blk_t) o;
      if (!FN(block_scores)(J, it, 0, L, S, &o)) continue;  // no key in the block: no weight
      int64_t bh = o.bh, i0 = o.i0, j0 = o.j0;
      int W = (int)(o.j1 - j0), M = (int)(o.i1 - i0);
      const R *lp = J->lse + bh * L + i0;
      R *wrow = J->wout + bh * wstr;
      void *ix = bh == 0 ? J->idx : NULL;  // the keys once, from the first head
      for (int64_t r = 0; r < M; r++) {
        int64_t a, e;
        row_band(g, i0 + r, j0, W, &a, &e);
        if (a >= e) continue;
        int64_t off = J->offs[i0 + r], n = e - a;
        if (off < 0 || off > ncol - n) { __atomic_store_n(J->bad, 1, __ATOMIC_RELAXED); continue; }
        FN(row_exp)(wrow + off, S + r * W + a, n, lp[r]);
        if (ix) put_keys(ix, g[B_WIDX], off, j0 + a, n);
      }
    }
    team_done(TM, stop - start);
  }
  free(S);
  if (J->setthreads) J->setthreads(0);
}

// ptr: q, k, lse (B * Hq, L) contiguous, values (B * Hq rows B_WSTR apart, B_WCOLS columns),
// offs (L,), indices (B_WCOLS,) of B_WIDX-byte integers or 0. geo: the B_* slots of the forward
// (q0 = 0, q1 = L) plus B_WCOLS, B_WSTR, B_WIDX; scale: the scores' factor on q, as
// band_forward's. Returns 0, -1 (out of memory), -2 (a row's run out of the buffer; that row was
// skipped), -3 (a bad index width, as band_forward) or -4 (a scale that is not finite).
int FN(band_weights)(const int64_t *ptr, const int64_t *geo, double scale, int nthreads,
                     void *const *rt) {
  if (!isfinite(scale)) return -4;
  FN(job_t) J;
  memset(&J, 0, sizeof J);
  J.qscale = (R)scale;
  int bad = 0;
  J.q = (const R *)ptr[0]; J.k = (const R *)ptr[1]; J.lse = (const R *)ptr[2];
  J.wout = (R *)ptr[3]; J.offs = (const int64_t *)ptr[4]; J.idx = (void *)ptr[5];
  if (!index_width_ok(J.idx, geo)) return -3;
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

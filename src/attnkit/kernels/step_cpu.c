// A pre-LN decoder block's cached decoding step in one call (loaded by attnkit/kernels/native.py
// via ctypes; calling convention in team.h). The step is the decoding kernels in sequence, with
// nothing between them that Python would have to run: LayerNorm + q/k/v projections + rotary
// embedding (gemv_cpu.c), the new keys and values written into the cache, attention of the new
// rows to every cached position (decode_cpu.c), output projection + residual, LayerNorm +
// first MLP layer + GELU, second MLP layer + residual. This file compiles both kernel sources
// into its own unit, so the steps share one thread pool and one team limit.
#include "gemv_cpu.c"
#include "decode_cpu.c"

// geometry slots: rows (sequences, one new token each), width, query heads, key/value heads,
// head dim, MLP hidden width, cache capacity, position of the new token, rotary on/off
enum { BS_R, BS_DIM, BS_H, BS_HKV, BS_HD, BS_HIDDEN, BS_CAP, BS_POS, BS_ROPE, BS_NGEO };
// ptr slots; eps points to the two LayerNorms' eps (double[2]); cos / sin: (1, hd) rotary rows
enum { BP_X, BP_OUT, BP_WQ, BP_WK, BP_WV, BP_BQ, BP_BK, BP_BV, BP_LN1W, BP_LN1B, BP_WO, BP_BO,
       BP_LN2W, BP_LN2B, BP_W1, BP_B1, BP_W2, BP_B2, BP_KBUF, BP_VBUF, BP_COS, BP_SIN, BP_EPS,
       BP_N };

// x (R, dim) -> out (R, dim); the caches (R, hkv, cap, hd) get row `pos` of every head written.
// Scores are scale * q.k. Returns -1 for bad sizes or a failed allocation, else 0.
int block_step(const int64_t *ptr, const int64_t *geo, double scale, int nthreads,
               void *const *rt) {
  const int64_t R = geo[BS_R], dim = geo[BS_DIM], h = geo[BS_H], hkv = geo[BS_HKV],
                hd = geo[BS_HD], hidden = geo[BS_HIDDEN], cap = geo[BS_CAP], pos = geo[BS_POS];
  const int rope = geo[BS_ROPE] != 0;
  if (R < 1 || dim < 1 || h < 1 || hkv < 1 || h % hkv || hd < 1 || hidden < 1 || pos < 0
      || pos >= cap || (rope && hd % 2))
    return -1;
  const double *eps = (const double *)ptr[BP_EPS];
  const int64_t nq = h * hd, nkv = hkv * hd, row = nq + 2 * nkv, g = h / hkv;
  float *qkv = (float *)malloc(sizeof(float) * R * row);
  float *q = (float *)malloc(sizeof(float) * R * nq);
  float *heads = (float *)malloc(sizeof(float) * R * nq);
  float *lse = (float *)malloc(sizeof(float) * R * h);
  float *x1 = (float *)malloc(sizeof(float) * R * dim);
  float *hid = (float *)malloc(sizeof(float) * R * hidden);
  int err = !qkv || !q || !heads || !lse || !x1 || !hid;
  if (!err) {  // LayerNorm + q, k, v (+ rotary on q and k)
    int64_t p[13] = {ptr[BP_X], (int64_t)qkv, ptr[BP_WQ], ptr[BP_WK], ptr[BP_WV], ptr[BP_BQ],
                     ptr[BP_BK], ptr[BP_BV], 0, ptr[BP_LN1W], ptr[BP_LN1B],
                     rope ? ptr[BP_COS] : 0, rope ? ptr[BP_SIN] : 0};
    int64_t gv[GV_NGEO] = {R, dim, 3, nq, nkv, nkv, 0, 1, rope ? nq + nkv : 0, hd, 1};
    err = gemv_rows(p, gv, eps[0], nthreads, rt) != 0;
  }
  if (!err) {  // new keys and values into the cache; queries gathered (R * hkv, g, hd)
    float *kbuf = (float *)ptr[BP_KBUF], *vbuf = (float *)ptr[BP_VBUF];
    for (int64_t r = 0; r < R; r++) {
      const float *src = qkv + r * row;
      memcpy(q + r * nq, src, sizeof(float) * nq);
      for (int64_t j = 0; j < hkv; j++) {
        int64_t at = ((r * hkv + j) * cap + pos) * hd;
        memcpy(kbuf + at, src + nq + j * hd, sizeof(float) * hd);
        memcpy(vbuf + at, src + nq + nkv + j * hd, sizeof(float) * hd);
      }
    }
    int64_t p[5] = {(int64_t)q, ptr[BP_KBUF], ptr[BP_VBUF], (int64_t)heads, (int64_t)lse};
    // nsplit 0: decode_split chooses the key chunks for the team, as for decode_forward calls
    int64_t gd[D_NGEO] = {R * hkv, g, pos + 1, hd, hd, cap * hd, cap * hd, 0};
    err = decode_forward(p, gd, scale, nthreads, rt) != 0;
  }
  if (!err) {  // x1 = x + heads @ Wo^T + bo
    int64_t p[13] = {(int64_t)heads, (int64_t)x1, ptr[BP_WO], 0, 0, ptr[BP_BO], 0, 0, ptr[BP_X],
                     0, 0, 0, 0};
    int64_t gv[GV_NGEO] = {R, nq, 1, dim, 0, 0, 0, 0, 0, 0, 0};
    err = gemv_rows(p, gv, 0.0, nthreads, rt) != 0;
  }
  if (!err) {  // hid = GELU(LayerNorm(x1) @ W1^T + b1)
    int64_t p[13] = {(int64_t)x1, (int64_t)hid, ptr[BP_W1], 0, 0, ptr[BP_B1], 0, 0, 0,
                     ptr[BP_LN2W], ptr[BP_LN2B], 0, 0};
    int64_t gv[GV_NGEO] = {R, dim, 1, hidden, 0, 0, 1, 1, 0, 0, 0};
    err = gemv_rows(p, gv, eps[1], nthreads, rt) != 0;
  }
  if (!err) {  // out = x1 + hid @ W2^T + b2
    int64_t p[13] = {(int64_t)hid, ptr[BP_OUT], ptr[BP_W2], 0, 0, ptr[BP_B2], 0, 0, (int64_t)x1,
                     0, 0, 0, 0};
    int64_t gv[GV_NGEO] = {R, hidden, 1, dim, 0, 0, 0, 0, 0, 0, 0};
    err = gemv_rows(p, gv, 0.0, nthreads, rt) != 0;
  }
  free(qkv); free(q); free(heads); free(lse); free(x1); free(hid);
  return err ? -1 : 0;
}

// A decoder's cached step through all its blocks in one call: block_step for each in turn (the
// hidden rows pass between two buffers), then, when logits is given, the final LayerNorm and
// the output layer. One native call per token where a call per block cost ~70 us of Python
// argument handling each.
// ptr: MP_* slots. layer_ptr: int64 (layers, BP_N), each block's ptr slots (its BP_X and
// BP_OUT are ignored: the rows come from x and the previous block); layer_geo: int64 (layers,
// BS_NGEO), each block's geometry (every BS_R and BS_DIM equal to this call's); scales:
// double (layers,), the score scales; x (R, dim): the embedded new tokens (read only, unless
// ids is given); out (R, dim): the last block's output; logits (R, vocab) or 0, written as
// LayerNorm(out; norm_w, norm_b, norm_eps) @ head_w (vocab, dim)^T + head_b (norm_w, norm_b,
// head_b may be 0). Optionally, so that a greedy decoding loop makes no tensor operation per
// token: ids (R,) int64, the new tokens, whose rows of embed (embed_rows, dim) are copied to x
// first; next (R,) int64, with logits, written with each row's argmax (the first maximum, or
// the first NaN, as torch.argmax).
// Returns -1 for bad sizes or a failed allocation (out and logits are then undefined), -2 for
// an id outside [0, embed_rows) (nothing done), else 0.
enum { MP_X, MP_OUT, MP_LAYER_PTR, MP_LAYER_GEO, MP_SCALES, MP_LOGITS, MP_HEAD_W, MP_HEAD_B,
       MP_NORM_W, MP_NORM_B, MP_NORM_EPS, MP_IDS, MP_EMBED, MP_NEXT, MP_N };
// geometry slots: blocks, rows, width, vocabulary (0 without logits), rows of embed (with ids)
enum { MS_LAYERS, MS_R, MS_DIM, MS_VOCAB, MS_EMBED_ROWS, MS_NGEO };

int model_step(const int64_t *ptr, const int64_t *geo, double unused, int nthreads,
               void *const *rt) {
  (void)unused;
  const int64_t layers = geo[MS_LAYERS], R = geo[MS_R], dim = geo[MS_DIM],
                vocab = geo[MS_VOCAB];
  const int64_t *lptr = (const int64_t *)ptr[MP_LAYER_PTR], *lgeo = (const int64_t *)ptr[MP_LAYER_GEO];
  const double *scales = (const double *)ptr[MP_SCALES];
  if (layers < 1 || R < 1 || dim < 1 || vocab < 0
      || (vocab > 0 && (!ptr[MP_HEAD_W] || !ptr[MP_LOGITS] || !ptr[MP_NORM_EPS]))
      || (ptr[MP_IDS] && !ptr[MP_EMBED]) || (ptr[MP_NEXT] && vocab < 1))
    return -1;
  for (int64_t l = 0; l < layers; l++)
    if (lgeo[l * BS_NGEO + BS_R] != R || lgeo[l * BS_NGEO + BS_DIM] != dim) return -1;
  if (ptr[MP_IDS]) {  // the new tokens' embeddings
    const int64_t *ids = (const int64_t *)ptr[MP_IDS];
    for (int64_t r = 0; r < R; r++)
      if (ids[r] < 0 || ids[r] >= geo[MS_EMBED_ROWS]) return -2;
    for (int64_t r = 0; r < R; r++)
      memcpy((float *)ptr[MP_X] + r * dim, (const float *)ptr[MP_EMBED] + ids[r] * dim,
             sizeof(float) * dim);
  }
  float *tmp = layers > 1 ? (float *)malloc(sizeof(float) * R * dim) : NULL;
  if (layers > 1 && !tmp) return -1;
  int err = 0;
  const float *src = (const float *)ptr[MP_X];
  for (int64_t l = 0; l < layers && !err; l++) {
    // the last block writes out; going back from it, the blocks alternate out / tmp, so no
    // block writes the rows it reads
    float *dst = (layers - 1 - l) % 2 == 0 ? (float *)ptr[MP_OUT] : tmp;
    int64_t p[BP_N];
    memcpy(p, lptr + l * BP_N, sizeof p);
    p[BP_X] = (int64_t)src;
    p[BP_OUT] = (int64_t)dst;
    err = block_step(p, lgeo + l * BS_NGEO, scales[l], nthreads, rt) != 0;
    src = dst;
  }
  free(tmp);
  if (!err && vocab > 0) {  // logits = LayerNorm(out) @ head_w^T + head_b
    int64_t p[13] = {ptr[MP_OUT], ptr[MP_LOGITS], ptr[MP_HEAD_W], 0, 0, ptr[MP_HEAD_B], 0, 0, 0,
                     ptr[MP_NORM_W], ptr[MP_NORM_B], 0, 0};
    int64_t gv[GV_NGEO] = {R, dim, 1, vocab, 0, 0, 0, 1, 0, 0, 0};
    err = gemv_rows(p, gv, *(const double *)ptr[MP_NORM_EPS], nthreads, rt) != 0;
  }
  if (!err && ptr[MP_NEXT]) {  // greedy: each row's argmax
    for (int64_t r = 0; r < R; r++) {
      const float *row = (const float *)ptr[MP_LOGITS] + r * vocab;
      int64_t best = 0;
      for (int64_t v = 0; v < vocab; v++) {
        if (isnan(row[v])) { best = v; break; }
        if (row[v] > row[best]) best = v;
      }
      ((int64_t *)ptr[MP_NEXT])[r] = best;
    }
  }
  return err ? -1 : 0;
}

// Thread teams and the calling convention of attnkit's compiled kernels (included by every
// kernel source: band_cpu.c, decode_cpu.c, short_cpu.c, gemv_cpu.c; native.py's build cache key
// covers this header).
//
// Every entry point has one signature,
//   int name(const int64_t *ptr, const int64_t *geo, double scale, int nthreads, void *const *rt)
// ptr: the addresses of its tensors (0 for an absent optional one), geo: its sizes, strides and
// integer options (the order is an enum in each source), scale: its one real parameter, nthreads:
// the team size asked for, rt: the runtime hooks below (NULL entries where absent). It returns
// 0, or -1 when a buffer could not be allocated or some work item was not done.
//
// Work items [0, total) are handed out in chunks through an atomic counter, so every item is
// done whatever team the runtime actually gives: OpenMP may start fewer threads than asked
// (omp_set_dynamic(1), which any library in the process may call; a call from inside another
// parallel region gets a team of one), pthread_create may fail, torch.set_num_threads may
// change between calls. Nothing depends on a thread's number. Each chunk is
// ceil(total / nthreads) items, so a full team gets the same contiguous shares a static split
// would (a thread streams its own block of memory), and a smaller one takes the rest in turn.
// team_run returns -1 unless every item was done (e.g. every thread failed to allocate).
#ifndef ATTNKIT_TEAM_H
#define ATTNKIT_TEAM_H
#include <stdint.h>
#include <pthread.h>

#define TEAM_MAX 64

typedef void (*gomp_parallel_t)(void (*)(void *), void *, unsigned, unsigned);
// Fortran BLAS sgemm (32-bit ints) and MKL's per-thread thread-count setter, from torch's library
typedef void (*sgemm_t)(const char *, const char *, const int *, const int *, const int *,
                        const float *, const float *, const int *, const float *, const int *,
                        const float *, float *, const int *);
typedef int (*setthreads_t)(int);

// rt[]: GOMP_parallel of torch's OpenMP runtime (NULL: POSIX threads), sgemm, MKL's setter,
// dgemm
enum { RT_OMP_PARALLEL, RT_SGEMM, RT_SET_BLAS_THREADS, RT_DGEMM, RT_COUNT };

typedef struct team_s {
  void (*run)(struct team_s *);  // a thread's part: take chunks with team_next until it fails
  void *arg;
  int64_t total, grain;
  int64_t next, done;  // atomics: first item not yet handed out; items finished
} team_t;

// The next chunk [*start, *stop) for the calling thread; 0 when none is left.
static inline int team_next(team_t *T, int64_t *start, int64_t *stop) {
  int64_t a = __atomic_fetch_add(&T->next, T->grain, __ATOMIC_RELAXED);
  if (a >= T->total) return 0;
  *start = a;
  *stop = a + T->grain < T->total ? a + T->grain : T->total;
  return 1;
}

// Record n items as finished (call after a chunk's results are written).
static inline void team_done(team_t *T, int64_t n) {
  __atomic_fetch_add(&T->done, n, __ATOMIC_RELAXED);
}

// Test hook: when > 0, a parallel region starts at most this many threads while the work is
// still cut for the team size asked for (a team that shrank, as under omp_set_dynamic(1)).
static int team_limit = 0;

int attnkit_set_team_limit(int n) {
  int old = team_limit;
  team_limit = n > 0 ? n : 0;
  return old;
}

static void team_omp(void *arg) {
  team_t *T = (team_t *)arg;
  T->run(T);
}

static void *team_pthread(void *arg) {
  team_t *T = (team_t *)arg;
  T->run(T);
  return NULL;
}

// Run `run` on up to nthreads threads: torch's OpenMP team through GOMP_parallel when given
// (its idle workers spin after each op, so new threads would compete with them), else POSIX
// threads. Returns 0 when every item was done, else -1.
static int team_run(void (*run)(team_t *), void *arg, int64_t total, int nthreads,
                    void *omp_parallel) {
  if (total <= 0) return 0;
  if (nthreads < 1) nthreads = 1;
  if (nthreads > TEAM_MAX) nthreads = TEAM_MAX;
  if (nthreads > total) nthreads = (int)total;
  team_t T;
  T.run = run; T.arg = arg; T.total = total; T.grain = (total + nthreads - 1) / nthreads;
  T.next = 0; T.done = 0;
  int start = nthreads;
  if (team_limit > 0 && start > team_limit) start = team_limit;
  if (start <= 1) {
    run(&T);
  } else if (omp_parallel) {
    ((gomp_parallel_t)omp_parallel)(team_omp, &T, (unsigned)start, 0);
  } else {
    pthread_t tid[TEAM_MAX];
    int started = 1;
    for (; started < start; started++)
      if (pthread_create(&tid[started], NULL, team_pthread, &T)) break;
    run(&T);
    for (int t = 1; t < started; t++) pthread_join(tid[t], NULL);
  }
  // chunks left by threads that could not set up (their allocation failed): one more try here
  if (__atomic_load_n(&T.next, __ATOMIC_RELAXED) < total) run(&T);
  return __atomic_load_n(&T.done, __ATOMIC_RELAXED) == total ? 0 : -1;
}
#endif

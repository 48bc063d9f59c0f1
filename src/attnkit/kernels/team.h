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
// change between calls. Nothing depends on a thread's number. With team_run each chunk is
// ceil(total / nthreads) items, so a full team gets the same contiguous shares a static split
// would (a thread streams its own block of memory), and a smaller one takes the rest in turn;
// team_run_shares cuts smaller chunks for items without locality between neighbours, and
// team_run_steal keeps the blocks but lets a thread that is done take over the end of another's.
// team_run returns -1 unless every item was done (e.g. every thread failed to allocate).
#ifndef ATTNKIT_TEAM_H
#define ATTNKIT_TEAM_H
#include <stdint.h>
#include <pthread.h>
#include <stddef.h>

#define TEAM_MAX 64

typedef void (*gomp_parallel_t)(void (*)(void *), void *, unsigned, unsigned);
// Fortran BLAS sgemm (32-bit ints) and MKL's per-thread thread-count setter, from torch's library
typedef void (*sgemm_t)(const char *, const char *, const int *, const int *, const int *,
                        const float *, const float *, const int *, const float *, const int *,
                        const float *, float *, const int *);
typedef int (*setthreads_t)(int);

// rt[]: GOMP_parallel of torch's OpenMP runtime (NULL: the pool), sgemm, MKL's setter,
// dgemm
enum { RT_OMP_PARALLEL, RT_SGEMM, RT_SET_BLAS_THREADS, RT_DGEMM, RT_COUNT };

// One block of a stealing team (team_run_steal): items [lo, hi) not yet handed out, packed
// lo << 32 | hi in one atomic word, on a cache line of its own.
typedef struct {
  uint64_t range;
  char pad[56];
} team_block_t;

typedef struct team_s {
  void (*run)(struct team_s *);  // a thread's part: take chunks with team_next until it fails
  void *arg;
  int64_t total, grain;
  int64_t next, done;  // atomics: first item not yet handed out; items finished
  int nblocks;          // team_run_steal: blocks (0 otherwise)
  team_block_t *blocks;
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

// Chunk [*start, *stop) of a stealing team (team_run_steal) for the calling thread, whose state
// is *own (-1 before its first call): a thread first takes a block of its own (in the order
// threads arrive) and works through it from the front, T->grain items at a time; when its block
// is empty it takes grains from the back of the block with the most items left. Each thread
// thus streams one contiguous block as a static split would, and the one that finishes first
// takes over the other's last part instead of waiting for it. 0 when nothing is left.
static int team_next_steal(team_t *T, int *own, int64_t *start, int64_t *stop) {
  if (*own == -1) {
    int64_t b = __atomic_fetch_add(&T->next, 1, __ATOMIC_RELAXED);
    *own = b < T->nblocks ? (int)b : -2;
  }
  if (*own >= 0) {  // the front of its own block
    uint64_t *r = &T->blocks[*own].range, cur = __atomic_load_n(r, __ATOMIC_RELAXED);
    for (;;) {
      int64_t lo = (int64_t)(cur >> 32), hi = (int64_t)(cur & 0xffffffffu);
      if (lo >= hi) break;
      int64_t end = lo + T->grain < hi ? lo + T->grain : hi;
      if (__atomic_compare_exchange_n(r, &cur, ((uint64_t)end << 32) | (uint64_t)hi, 0,
                                      __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
        *start = lo; *stop = end;
        return 1;
      }
    }
    *own = -2;
  }
  for (;;) {  // the back of the fullest block
    int best = -1;
    int64_t most = 0;
    for (int b = 0; b < T->nblocks; b++) {
      uint64_t cur = __atomic_load_n(&T->blocks[b].range, __ATOMIC_RELAXED);
      int64_t left = (int64_t)(cur & 0xffffffffu) - (int64_t)(cur >> 32);
      if (left > most) { most = left; best = b; }
    }
    if (best < 0) return 0;
    uint64_t *r = &T->blocks[best].range, cur = __atomic_load_n(r, __ATOMIC_RELAXED);
    int64_t lo = (int64_t)(cur >> 32), hi = (int64_t)(cur & 0xffffffffu);
    if (lo >= hi) continue;
    int64_t beg = hi - T->grain > lo ? hi - T->grain : lo;
    if (__atomic_compare_exchange_n(r, &cur, ((uint64_t)lo << 32) | (uint64_t)beg, 0,
                                    __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
      *start = beg; *stop = hi;
      return 1;
    }
  }
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

// ---- the kernels' own thread pool (used when no OpenMP runtime is given)
//
// Helpers are created once and sleep on a condition variable between jobs (after a short spin,
// so back-to-back calls of a decoding step find them awake). The calling thread works on the
// job itself, and a helper that wakes after the job is closed never joins it: the caller waits
// only for chunks actually taken. On a busy machine a descheduled helper then costs nothing,
// where a fork-join team (OpenMP's barrier, pthread_join) waits for its time slice, and helpers
// that sleep instead of spinning leave the cores to the work. One job at a time per library:
// a concurrent caller runs its job alone (same results).
#define POOL_SPIN 20000

typedef struct {
  pthread_mutex_t m;
  pthread_cond_t wake, idle;
  team_t *job;
  int64_t gen;                             // job generation (read without the lock while spinning)
  int open, want, joined, active, nhelpers;
} pool_t;

static pool_t pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER,
                      PTHREAD_COND_INITIALIZER, NULL, 0, 0, 0, 0, 0, 0};
static pthread_mutex_t pool_owner = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t pool_once = PTHREAD_ONCE_INIT;

static void pool_after_fork(void) {  // the child has none of the helpers: start afresh
  pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
  pthread_cond_t c = PTHREAD_COND_INITIALIZER;
  pool.m = m; pool.wake = c; pool.idle = c; pool_owner = m;
  pool.job = NULL; pool.open = pool.want = pool.joined = pool.active = pool.nhelpers = 0;
}

static void pool_init(void) { pthread_atfork(NULL, NULL, pool_after_fork); }

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

static void *pool_helper(void *arg) {
  int64_t seen = (int64_t)(intptr_t)arg;  // the generation before the job it was created for
  pthread_mutex_lock(&pool.m);
  for (;;) {
    if (pool.gen == seen) {
      pthread_mutex_unlock(&pool.m);
      for (int i = 0; i < POOL_SPIN && __atomic_load_n(&pool.gen, __ATOMIC_ACQUIRE) == seen; i++)
        cpu_relax();
      pthread_mutex_lock(&pool.m);
      while (pool.gen == seen) pthread_cond_wait(&pool.wake, &pool.m);
    }
    seen = pool.gen;
    if (pool.open && pool.joined < pool.want) {
      team_t *T = pool.job;
      pool.joined++;
      __atomic_add_fetch(&pool.active, 1, __ATOMIC_RELAXED);
      pthread_mutex_unlock(&pool.m);
      T->run(T);
      pthread_mutex_lock(&pool.m);
      if (__atomic_sub_fetch(&pool.active, 1, __ATOMIC_RELEASE) == 0)
        pthread_cond_signal(&pool.idle);
    }
  }
  return NULL;
}

// T->run on the calling thread and up to `helpers` pool threads.
static void pool_run(team_t *T, int helpers) {
  pthread_once(&pool_once, pool_init);
  if (pthread_mutex_trylock(&pool_owner)) {  // another caller holds the pool: run alone
    T->run(T);
    return;
  }
  pthread_mutex_lock(&pool.m);
  while (pool.nhelpers < helpers) {
    pthread_t tid;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    int rc = pthread_create(&tid, &attr, pool_helper, (void *)(intptr_t)pool.gen);
    pthread_attr_destroy(&attr);
    if (rc) break;  // fewer helpers: the caller takes their chunks
    pool.nhelpers++;
  }
  pool.job = T; pool.want = helpers; pool.joined = 0; pool.open = 1;
  __atomic_store_n(&pool.gen, pool.gen + 1, __ATOMIC_RELEASE);
  pthread_cond_broadcast(&pool.wake);
  pthread_mutex_unlock(&pool.m);
  T->run(T);
  pthread_mutex_lock(&pool.m);
  pool.open = 0;  // helpers not yet joined stay out; wait for those working
  if (pool.active > 0) {
    // a helper with an equal share finishes within microseconds of the caller: spin a while
    // (as the helpers do) before sleeping, since a wake-up through the condition variable
    // costs tens of microseconds and a decoding step waits like this ~30 times
    pthread_mutex_unlock(&pool.m);
    for (int i = 0; i < POOL_SPIN && __atomic_load_n(&pool.active, __ATOMIC_ACQUIRE) > 0; i++)
      cpu_relax();
    pthread_mutex_lock(&pool.m);
  }
  while (pool.active > 0) pthread_cond_wait(&pool.idle, &pool.m);
  pool.job = NULL;
  pthread_mutex_unlock(&pool.m);
  pthread_mutex_unlock(&pool_owner);
}

// Runs T->run on up to nthreads threads (fewer under the test hook's limit): torch's OpenMP
// team through GOMP_parallel when given (its idle workers spin after each op, so new threads
// would compete with them), else the kernels' own pool (above).
static void team_start(team_t *T, int nthreads, void *omp_parallel) {
  int start = nthreads;
  if (team_limit > 0 && start > team_limit) start = team_limit;
  if (start <= 1) {
    T->run(T);
  } else if (omp_parallel) {
    ((gomp_parallel_t)omp_parallel)(team_omp, T, (unsigned)start, 0);
  } else {
    pool_run(T, start - 1);
  }
}

// Start the team on T (team_start), then run on the calling thread the chunks left by threads
// that could not set up (their allocation failed): 0 when every item was done, else -1.
static int team_launch(team_t *T, int nthreads, void *omp_parallel) {
  team_start(T, nthreads, omp_parallel);
  if (__atomic_load_n(&T->done, __ATOMIC_RELAXED) < T->total) T->run(T);
  return __atomic_load_n(&T->done, __ATOMIC_RELAXED) == T->total ? 0 : -1;
}

// The team size for total items: nthreads within [1, min(TEAM_MAX, total)].
static inline int team_size(int64_t total, int nthreads) {
  if (nthreads < 1) nthreads = 1;
  if (nthreads > TEAM_MAX) nthreads = TEAM_MAX;
  return nthreads > total ? (int)total : nthreads;
}

// Run `run` on up to nthreads threads (team_start). Items go out in chunks of 1 / (nthreads *
// shares) of the total: shares = 1 gives each thread of a full team one contiguous block; more
// shares let a thread that the OS preempts (a busy machine) leave the rest of its share to the
// others, for independent items with no locality between neighbours. Returns 0 when every item
// was done, else -1.
static int team_run_shares(void (*run)(team_t *), void *arg, int64_t total, int nthreads,
                           int shares, void *omp_parallel) {
  if (total <= 0) return 0;
  nthreads = team_size(total, nthreads);
  if (shares < 1) shares = 1;
  team_t T;
  int64_t pieces = (int64_t)nthreads * shares;
  T.run = run; T.arg = arg; T.total = total; T.grain = (total + pieces - 1) / pieces;
  T.next = 0; T.done = 0; T.nblocks = 0; T.blocks = NULL;
  return team_launch(&T, nthreads, omp_parallel);
}

static inline int team_run(void (*run)(team_t *), void *arg, int64_t total, int nthreads,
                    void *omp_parallel) {
  return team_run_shares(run, arg, total, nthreads, 1, omp_parallel);
}

// Run `run` (taking its chunks with team_next_steal) on up to nthreads threads over items
// [0, total) cut into nthreads contiguous blocks, handed out `grain` items at a time (see
// team_next_steal). For streaming work whose threads finish unevenly: the decoding GEMVs, where
// a static split left one thread waiting ~20% of each product's time (memory bandwidth per core
// varies from one product to the next), and smaller chunks for everyone broke the streams.
// Returns 0 when every item was done, else -1.
static int team_run_steal(void (*run)(team_t *), void *arg, int64_t total, int nthreads,
                          int64_t grain, void *omp_parallel) {
  if (total <= 0) return 0;
  if (total > 0xffffffffLL) return -1;  // packed 32-bit bounds
  nthreads = team_size(total, nthreads);
  team_block_t blocks[TEAM_MAX] __attribute__((aligned(64)));
  for (int b = 0; b < nthreads; b++) {
    uint64_t lo = (uint64_t)(total * b / nthreads), hi = (uint64_t)(total * (b + 1) / nthreads);
    blocks[b].range = (lo << 32) | hi;
  }
  team_t T;
  T.run = run; T.arg = arg; T.total = total; T.grain = grain < 1 ? 1 : grain;
  T.next = 0; T.done = 0; T.nblocks = nthreads; T.blocks = blocks;
  return team_launch(&T, nthreads, omp_parallel);
}
#endif

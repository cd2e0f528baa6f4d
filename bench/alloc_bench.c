/* Allocation-heavy multithreaded microbenchmark: each thread mallocs and frees blocks of
 * varying size through a few call levels, keeping a window of 64 live blocks.
 * Usage: alloc_bench THREADS ITERATIONS   -> prints ns per malloc+free pair. */
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static long iters;

__attribute__((noinline)) static void *make(size_t n) { return malloc(n); }
__attribute__((noinline)) static void *make_object(unsigned i) { return make(16 + (i * 37) % 496); }

static void *worker(void *arg) {
  void *window[64] = {0};
  unsigned seed = (unsigned)(long)arg;
  for (long i = 0; i < iters; i++) {
    unsigned slot = (seed = seed * 1103515245u + 12345u) >> 26;
    free(window[slot]);
    window[slot] = make_object(seed);
    *(volatile char *)window[slot] = 1;
  }
  for (int i = 0; i < 64; i++) free(window[i]);
  return NULL;
}

static double once(int threads) {
  pthread_t t[64];
  struct timespec a, b;
  clock_gettime(CLOCK_MONOTONIC, &a);
  for (long i = 0; i < threads; i++) pthread_create(&t[i], NULL, worker, (void *)(i + 1));
  for (int i = 0; i < threads; i++) pthread_join(t[i], NULL);
  clock_gettime(CLOCK_MONOTONIC, &b);
  double ns = (b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec);
  return ns / iters; /* wall ns per round per thread */
}

/* With ALLOC_BENCH_PHASES=N: prints "ready PID", then N times waits for a line on stdin
 * and prints one measurement (so that kal attach / detach can happen between phases).
 * With ALLOC_BENCH_DLOPEN=PATH: dlopen()s PATH first (kal's agent opened that way takes
 * the path of `kal attach`: dynamic TLS, GOT redirection), e.g. to count the attached
 * hooks' instructions under callgrind, where kal attach cannot reach. */
int main(int argc, char **argv) {
  int threads = argc > 1 ? atoi(argv[1]) : 2;
  iters = argc > 2 ? atol(argv[2]) : 5000000;
  const char *lib = getenv("ALLOC_BENCH_DLOPEN");
  if (lib && !dlopen(lib, RTLD_NOW)) {
    fprintf(stderr, "alloc_bench: %s\n", dlerror());
    return 1;
  }
  const char *phases = getenv("ALLOC_BENCH_PHASES");
  if (!phases) {
    printf("%.1f\n", once(threads));
    return 0;
  }
  printf("ready %d\n", getpid());
  fflush(stdout);
  char line[64];
  for (int p = atoi(phases); p > 0 && fgets(line, sizeof line, stdin); p--) {
    printf("%.1f\n", once(threads));
    fflush(stdout);
  }
  return 0;
}

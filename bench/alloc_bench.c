/* Allocation-heavy multithreaded microbenchmark: each thread mallocs and frees blocks of
 * varying size through a few call levels, keeping a window of 64 live blocks.
 * Usage: alloc_bench THREADS ITERATIONS   -> prints ns per malloc+free pair. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

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

int main(int argc, char **argv) {
  int threads = argc > 1 ? atoi(argv[1]) : 2;
  iters = argc > 2 ? atol(argv[2]) : 5000000;
  pthread_t t[64];
  struct timespec a, b;
  clock_gettime(CLOCK_MONOTONIC, &a);
  for (long i = 0; i < threads; i++) pthread_create(&t[i], NULL, worker, (void *)(i + 1));
  for (int i = 0; i < threads; i++) pthread_join(t[i], NULL);
  clock_gettime(CLOCK_MONOTONIC, &b);
  double ns = (b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec);
  printf("%.1f\n", ns / iters); /* wall ns per round per thread */
  return 0;
}

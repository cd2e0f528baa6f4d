/* 50 million live 16-byte blocks from 4 threads. Each thread mallocs 12.5 M blocks into
 * its own pointer array (private anonymous mmap, not a heap block), then leaks exactly 250
 * of them by overwriting their pointers; the threads wait for each other, then exit.
 * Total: 1000 blocks (16,000 bytes) definitely lost, 49,999,000 blocks still reachable.
 *
 * fifty_million [wait]   with "wait", main says "ready PID" when all blocks are in place
 *                        and sleeps until killed (for live checks). */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#define THREADS 4
#define PER_THREAD 12500000L
#define LEAK_PER_THREAD 250

static void **arrays[THREADS];
static pthread_barrier_t done;

static void *worker(void *arg) {
  long t = (long)arg;
  void **a = mmap(NULL, PER_THREAD * sizeof(void *), PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (a == MAP_FAILED) {
    perror("mmap");
    exit(2);
  }
  arrays[t] = a;
  for (long i = 0; i < PER_THREAD; i++) {
    uint64_t *b = malloc(16); /* @fm_block */
    if (!b) {
      fprintf(stderr, "out of memory\n");
      exit(2);
    }
    b[0] = (uint64_t)i * 2 + 1; /* odd: never looks like a pointer */
    b[1] = (uint64_t)t;
    a[i] = b;
  }
  /* Leak 250 blocks spread over the array (never the last one, which a register may
   * still hold). */
  for (long k = 0; k < LEAK_PER_THREAD; k++) a[k * (PER_THREAD / LEAK_PER_THREAD) + 7] = NULL;
  pthread_barrier_wait(&done);
  return NULL;
}

int main(int argc, char **argv) {
  pthread_t th[THREADS];
  pthread_barrier_init(&done, NULL, THREADS + 1);
  for (long t = 0; t < THREADS; t++) pthread_create(&th[t], NULL, worker, (void *)t);
  pthread_barrier_wait(&done);
  for (int t = 0; t < THREADS; t++) pthread_join(th[t], NULL);
  if (argc > 1) {
    printf("ready %d\n", getpid());
    fflush(stdout);
    for (;;) pause();
  }
  return 0;
}

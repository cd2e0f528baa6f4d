/* A heap spread over far more than 64 MiB of address space, in glibc's thread arenas:
 * 8 threads each keep about 72 MiB of blocks of varied sizes (16 to 1,039 bytes) in a
 * pointer array that is itself a heap block reached from a global, so each thread's arena
 * grows past one 64 MiB heap. Each thread also leaks, at known places, 40 blocks by
 * overwriting their pointers and 20 pairs (a block holding the only pointer to another):
 *
 *   direct:   8 × (40 + 20) = 480 blocks, indirect: 8 × 20 = 160 blocks
 *
 * Sizes are a function of (thread, index), so the byte counts are exact too; the
 * program prints them: "leaks direct BYTES BLOCKS indirect BYTES BLOCKS kept BYTES BLOCKS".
 *
 * arenas [wait]   with "wait", says "ready PID" (before the tally line) when all is in
 *                 place, then sleeps until killed. */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define THREADS 8
#define PER_THREAD_BYTES (72L << 20)
#define LEAKS 40
#define PAIRS 20

struct tally {
  long direct_bytes, direct_blocks, indirect_bytes, indirect_blocks, kept_bytes, kept_blocks;
};

void **kept[THREADS];
static long counts[THREADS];
static struct tally tallies[THREADS];
static pthread_barrier_t done;

static size_t size_of(long t, long i) {
  uint64_t x = (uint64_t)(t * 1000003 + i) * 0x9e3779b97f4a7c15ULL;
  return 16 + (x >> 54); /* 16 .. 1039 */
}

static void *worker(void *arg) {
  long t = (long)arg;
  struct tally *y = &tallies[t];
  long cap = PER_THREAD_BYTES / 16;
  void **a = malloc(cap * sizeof(void *)); /* @ar_array */
  kept[t] = a;
  y->kept_bytes += cap * sizeof(void *);
  y->kept_blocks++;
  long n = 0, bytes = 0;
  while (bytes < PER_THREAD_BYTES) {
    size_t s = size_of(t, n);
    unsigned char *b = malloc(s); /* @ar_block */
    memset(b, (int)(n & 0x7f) | 1, s); /* odd bytes: no word looks like a pointer */
    a[n++] = b;
    bytes += s;
  }
  counts[t] = n;
  /* Leak: every 997th block from 1000 on, 40 of them: overwrite the only pointer. */
  for (long k = 0; k < LEAKS; k++) {
    long i = 1000 + k * 997;
    y->direct_bytes += size_of(t, i);
    y->direct_blocks++;
    a[i] = NULL;
  }
  /* Leak pairs: block i gets the only pointer to block i + 1, then both leave the array. */
  for (long k = 0; k < PAIRS; k++) {
    long i = 60000 + k * 1009;
    if (size_of(t, i) < 8) abort();
    memcpy(a[i], &a[i + 1], sizeof(void *));
    y->direct_bytes += size_of(t, i);
    y->direct_blocks++;
    y->indirect_bytes += size_of(t, i + 1);
    y->indirect_blocks++;
    a[i] = NULL;
    a[i + 1] = NULL;
  }
  for (long i = 0; i < n; i++)
    if (a[i]) {
      y->kept_bytes += size_of(t, i);
      y->kept_blocks++;
    }
  pthread_barrier_wait(&done);
  return NULL;
}

int main(int argc, char **argv) {
  pthread_t th[THREADS];
  pthread_barrier_init(&done, NULL, THREADS + 1);
  for (long t = 0; t < THREADS; t++) pthread_create(&th[t], NULL, worker, (void *)t);
  pthread_barrier_wait(&done);
  for (int t = 0; t < THREADS; t++) pthread_join(th[t], NULL);
  struct tally s = {0};
  for (int t = 0; t < THREADS; t++) {
    s.direct_bytes += tallies[t].direct_bytes;
    s.direct_blocks += tallies[t].direct_blocks;
    s.indirect_bytes += tallies[t].indirect_bytes;
    s.indirect_blocks += tallies[t].indirect_blocks;
    s.kept_bytes += tallies[t].kept_bytes;
    s.kept_blocks += tallies[t].kept_blocks;
  }
  if (argc > 1) printf("ready %d\n", getpid());
  printf("leaks direct %ld %ld indirect %ld %ld kept %ld %ld\n", s.direct_bytes,
         s.direct_blocks, s.indirect_bytes, s.indirect_blocks, s.kept_bytes, s.kept_blocks);
  fflush(stdout);
  if (argc > 1)
    for (;;) pause();
  return 0;
}

/* Four threads malloc, free and realloc continuously, each block filled with a pattern
 * checked before every free and after every realloc; each thread's pool is filled before
 * "ready PID" is printed, so blocks allocated before an attach are freed after it. Stops
 * at a line on stdin and prints "ok ROUNDS", or "BAD" and aborts on a wrong byte. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#define SLOTS 64
struct blk { unsigned char *p; size_t n; unsigned char v; };
static volatile int stop;
static struct blk pool[4][SLOTS];
static long rounds[4];
static void check(struct blk *b) {
  for (size_t i = 0; i < b->n; i++)
    if (b->p[i] != b->v) { printf("BAD\n"); fflush(stdout); abort(); }
}
static void *work(void *arg) {
  long t = (long)arg;
  unsigned s = 12345u + (unsigned)t;
  while (!stop) {
    s = s * 1103515245u + 12345u;
    struct blk *b = &pool[t][(s >> 8) % SLOTS];
    size_t n = 1 + (s >> 16) % 3000;
    check(b);
    switch ((s >> 4) % 3) {
    case 0: free(b->p); b->p = malloc(n); break;
    case 1: { unsigned char *q = realloc(b->p, n); if (!q) abort(); b->p = q;
              if (n < b->n) b->n = n; check(b); break; }
    default: free(b->p); b->p = calloc(1, n); memset(b->p, 0, n); break;
    }
    b->n = n;
    b->v = (unsigned char)(s >> 24);
    memset(b->p, b->v, n);
    rounds[t]++;
  }
  return NULL;
}
int main(void) {
  pthread_t th[4];
  for (int t = 0; t < 4; t++)
    for (int i = 0; i < SLOTS; i++) {
      struct blk *b = &pool[t][i];
      b->n = 16 + i; b->v = (unsigned char)i; b->p = malloc(b->n); memset(b->p, b->v, b->n);
    }
  for (long t = 0; t < 4; t++) pthread_create(&th[t], NULL, work, (void *)t);
  printf("ready %d\n", getpid());
  fflush(stdout);
  char line[16];
  if (!fgets(line, sizeof line, stdin)) return 1;
  stop = 1;
  long total = 0;
  for (int t = 0; t < 4; t++) { pthread_join(th[t], NULL); total += rounds[t]; }
  for (int t = 0; t < 4; t++) for (int i = 0; i < SLOTS; i++) { check(&pool[t][i]); free(pool[t][i].p); }
  printf("ok %ld\n", total > 0 ? 1L : 0L);
  return 0;
}

/* Eight threads malloc, free and realloc continuously across threads: each round a thread
 * takes a random slot of any thread's pool (under that slot's lock), so blocks one thread
 * allocated are freed or reallocated by another. Each block is filled with a pattern,
 * checked before every free and after every realloc; the pools are filled before
 * "ready PID" is printed, so blocks allocated before an attach are freed after it. Stops
 * at a line on stdin and prints "ok ROUNDS>0", or "BAD" and aborts on a wrong byte. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#define SLOTS 64
#define NT 8
struct blk { unsigned char *p; size_t n; unsigned char v; pthread_mutex_t m; };
static volatile int stop;
static struct blk pool[NT][SLOTS];
static long rounds[NT];
static void check(struct blk *b) {
  for (size_t i = 0; i < b->n; i++)
    if (b->p[i] != b->v) { printf("BAD\n"); fflush(stdout); abort(); }
}
static void *work(void *arg) {
  long t = (long)arg;
  unsigned s = 12345u + (unsigned)t;
  while (!stop) {
    s = s * 1103515245u + 12345u;
    struct blk *b = &pool[(s >> 20) % NT][(s >> 8) % SLOTS];
    size_t n = 1 + (s >> 16) % 3000;
    pthread_mutex_lock(&b->m);
    check(b);
    switch ((s >> 4) % 3) {
    case 0: free(b->p); b->p = malloc(n); break;
    case 1: { unsigned char *q = realloc(b->p, n); if (!q) abort(); b->p = q;
              if (n < b->n) b->n = n; check(b); break; }
    default: free(b->p); b->p = calloc(1, n); break;
    }
    b->n = n;
    b->v = (unsigned char)(s >> 24);
    memset(b->p, b->v, n);
    pthread_mutex_unlock(&b->m);
    rounds[t]++;
  }
  return NULL;
}
int main(void) {
  pthread_t th[NT];
  for (int t = 0; t < NT; t++)
    for (int i = 0; i < SLOTS; i++) {
      struct blk *b = &pool[t][i];
      pthread_mutex_init(&b->m, NULL);
      b->n = 16 + i; b->v = (unsigned char)i; b->p = malloc(b->n); memset(b->p, b->v, b->n);
    }
  for (long t = 0; t < NT; t++) pthread_create(&th[t], NULL, work, (void *)t);
  printf("ready %d\n", getpid());
  fflush(stdout);
  char line[16];
  if (!fgets(line, sizeof line, stdin)) return 1;
  stop = 1;
  long total = 0;
  for (int t = 0; t < NT; t++) { pthread_join(th[t], NULL); total += rounds[t]; }
  for (int t = 0; t < NT; t++) for (int i = 0; i < SLOTS; i++) { check(&pool[t][i]); free(pool[t][i].p); }
  printf("ok %ld\n", total > 0 ? 1L : 0L);
  return 0;
}

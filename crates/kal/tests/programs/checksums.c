/* Keeps a large reachable structure — plain pointers, pointers 8 and 16 bytes into blocks,
 * a block held only on a sleeping thread's stack — and verifies its checksums while it
 * also leaks. Exits 1 at the first corruption. Usage: checksums SECONDS */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define N 2000
struct item { uint64_t sum; unsigned char data[200]; };
static struct item *plain[N];
static char *plus8[N];   /* each points 8 bytes into its block (a length prefix) */
static char *plus16[N];  /* each points 16 bytes into its block (a header) */
static volatile int stop;
static pthread_barrier_t ready;
static uint64_t stack_sum;
static unsigned char *volatile stack_block_check;

static uint64_t sum(const unsigned char *p, size_t n) {
  uint64_t s = 1469598103934665603ull;
  for (size_t i = 0; i < n; i++) s = (s ^ p[i]) * 1099511628211ull;
  return s;
}
static void fill(unsigned char *p, size_t n, unsigned seed) {
  for (size_t i = 0; i < n; i++) p[i] = (unsigned char)(seed * 31 + i * 7);
}
static void *sleeper(void *arg) {
  (void)arg;
  unsigned char *mine = malloc(4096); /* only this thread's stack points here */
  fill(mine, 4096, 99);
  stack_sum = sum(mine, 4096);
  pthread_barrier_wait(&ready);
  while (!stop) {
    usleep(50000);
    if (sum(mine, 4096) != stack_sum) { fprintf(stderr, "stack block corrupted\n"); exit(1); }
  }
  return mine;
}
int main(int argc, char **argv) {
  int secs = argc > 1 ? atoi(argv[1]) : 5;
  pthread_t t;
  pthread_barrier_init(&ready, NULL, 2);
  pthread_create(&t, NULL, sleeper, NULL);
  for (int i = 0; i < N; i++) {
    plain[i] = malloc(sizeof *plain[i]);
    fill(plain[i]->data, sizeof plain[i]->data, i);
    plain[i]->sum = sum(plain[i]->data, sizeof plain[i]->data);
    char *a = malloc(8 + 100);
    *(uint64_t *)a = 100;
    fill((unsigned char *)a + 8, 100, i + 1);
    plus8[i] = a + 8;
    char *b = malloc(16 + 100);
    memset(b, 0, 16);
    fill((unsigned char *)b + 16, 100, i + 2);
    plus16[i] = b + 16;
  }
  pthread_barrier_wait(&ready);
  uint64_t want8[N], want16[N];
  for (int i = 0; i < N; i++) {
    want8[i] = sum((unsigned char *)plus8[i], 100);
    want16[i] = sum((unsigned char *)plus16[i], 100);
  }
  for (int round = 0; round < secs * 20; round++) {
    for (int k = 0; k < 50; k++) { char *leak = malloc(1000); memset(leak, k, 1000); } /* @cs_leak */
    for (int i = 0; i < N; i++) {
      if (sum(plain[i]->data, sizeof plain[i]->data) != plain[i]->sum ||
          sum((unsigned char *)plus8[i], 100) != want8[i] || sum((unsigned char *)plus16[i], 100) != want16[i]) {
        fprintf(stderr, "corruption in item %d\n", i);
        return 1;
      }
    }
    usleep(50000);
  }
  stop = 1;
  pthread_join(t, NULL);
  printf("checksums ok\n");
  return 0;
}

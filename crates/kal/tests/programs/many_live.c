/* Keeps N blocks live (each filled with a pattern), reachable from an array allocated after
 * them, leaks 10 more, says "ready PID", then ticks every 20 ms; after SECONDS (0: never)
 * it checks every pattern, prints "many ok" or "many CORRUPT", frees everything and exits.
 * When the agent's table is too small, the array is not recorded, so the first blocks,
 * which only it points to, look lost: reclaiming them would corrupt the program.
 * Usage: many_live N SECONDS */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
void *volatile sink;
__attribute__((noinline)) static void leak(void) {
  sink = malloc(48); /* @many_leak */
  memset(sink, 7, 48);
}
int main(int argc, char **argv) {
  long n = argc > 1 ? atol(argv[1]) : 20000;
  long secs = argc > 2 ? atol(argv[2]) : 0;
  unsigned char **tmp = malloc(n * sizeof *tmp);
  for (long i = 0; i < n; i++) {
    tmp[i] = malloc(32);
    memset(tmp[i], (int)(i & 0xff), 32);
  }
  unsigned char **keep = malloc(n * sizeof *keep);
  memcpy(keep, tmp, n * sizeof *keep);
  memset(tmp, 0, n * sizeof *tmp);
  free(tmp);
  for (int i = 0; i < 10; i++) leak();
  sink = NULL;
  printf("ready %d\n", getpid());
  fflush(stdout);
  for (long t = 0; secs == 0 || t < secs * 50; t++) {
    usleep(20000);
    printf("tick %ld\n", t);
    fflush(stdout);
  }
  int ok = 1;
  for (long i = 0; i < n; i++)
    for (int j = 0; j < 32; j++) ok &= keep[i][j] == (unsigned char)(i & 0xff);
  for (long i = 0; i < n; i++) free(keep[i]);
  free(keep);
  printf(ok ? "many ok\n" : "many CORRUPT\n");
  return 0;
}

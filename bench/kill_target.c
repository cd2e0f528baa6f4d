/* The target of bench/kill_stress.sh: a self-verifying program (as
 * crates/kal/tests/programs/verifier.c) that also leaks, so that `kal reclaim` has blocks
 * to park. MIB mebibytes in 64 KiB blocks, each filled with a pattern derived from its
 * index. Prints "ready PID", then forever: leaks eight 4 KiB blocks, checks every kept
 * block (every 61st word) and prints "ok N" (N = rounds so far), or "CORRUPT" and exits 3.
 * Usage: kill_target MIB */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#define BLOCK (64 * 1024)
static uint64_t pattern(long i, long j) { return (uint64_t)i * 0x9e3779b97f4a7c15u + j; }
int main(int argc, char **argv) {
  long n = (argc > 1 ? atol(argv[1]) : 256) * 1024 * 1024 / BLOCK;
  uint64_t **b = malloc(n * sizeof *b);
  for (long i = 0; i < n; i++) {
    b[i] = malloc(BLOCK);
    for (long j = 0; j < BLOCK / 8; j++) b[i][j] = pattern(i, j);
  }
  printf("ready %d\n", getpid());
  fflush(stdout);
  for (long round = 1;; round++) {
    for (int k = 0; k < 8; k++) {
      void *volatile leak = malloc(4096);
      memset(leak, 0x5a, 4096);
      leak = NULL;
    }
    for (long i = 0; i < n; i++)
      for (long j = 0; j < BLOCK / 8; j += 61)
        if (b[i][j] != pattern(i, j)) {
          puts("CORRUPT");
          fflush(stdout);
          return 3;
        }
    printf("ok %ld\n", round);
    fflush(stdout);
    usleep(20000);
  }
}

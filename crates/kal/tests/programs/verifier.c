/* A self-verifying target: MIB mebibytes in 64 KiB blocks, each filled with a pattern
 * derived from its index. Prints "ready PID", then forever: checks every block and prints
 * "ok N" (N = rounds so far) or "CORRUPT" (and exits 3). Usage: verifier MIB */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#define BLOCK (64 * 1024)
int main(int argc, char **argv) {
  long n = (argc > 1 ? atol(argv[1]) : 256) * 1024 * 1024 / BLOCK;
  uint64_t **b = malloc(n * sizeof *b);
  for (long i = 0; i < n; i++) {
    b[i] = malloc(BLOCK);
    for (long j = 0; j < BLOCK / 8; j++) b[i][j] = (uint64_t)i * 0x9e3779b97f4a7c15u + j;
  }
  printf("ready %d\n", getpid());
  fflush(stdout);
  for (long round = 1;; round++) {
    for (long i = 0; i < n; i++)
      for (long j = 0; j < BLOCK / 8; j += 61)
        if (b[i][j] != (uint64_t)i * 0x9e3779b97f4a7c15u + j) {
          puts("CORRUPT");
          return 3;
        }
    printf("ok %ld\n", round);
    fflush(stdout);
    usleep(20000);
  }
}

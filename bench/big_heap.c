/* A big heap of equal blocks, all touched, and waits. Prints "ready PID".
 * Usage: big_heap [MiB] [BLOCK_SIZE] [CHAIN]
 *
 * MiB of BLOCK_SIZE-byte blocks (default 1024 MiB of 4096-byte blocks). With CHAIN = 0
 * (the default for blocks of 4 KB and more) every block is held by one array of pointers,
 * as in the issue-3 benchmark. With CHAIN > 0 (default 16 for smaller blocks) blocks form
 * doubly linked chains of CHAIN: word 0 points to the next block of the chain, word 1
 * (blocks of 16 bytes and more) to the previous one, the rest is non-pointer data. An array
 * holds the chain heads in random order (a hash table of lists), except every 1024th
 * chain, which is leaked (one direct leak and CHAIN - 1 indirect ones each). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv) {
  long mib = argc > 1 ? atol(argv[1]) : 1024;
  long size = argc > 2 ? atol(argv[2]) : 4096;
  if (size < 8) size = 8;
  long chain = argc > 3 ? atol(argv[3]) : (size >= 4096 ? 0 : 16);
  long n = (mib << 20) / size;
  if (chain <= 0) {
    char **blocks = malloc(n * sizeof *blocks);
    for (long i = 0; i < n; i++) {
      blocks[i] = malloc(size);
      memset(blocks[i], (int)i, size);
    }
  } else {
    long chains = (n + chain - 1) / chain, kept = 0;
    void **heads = malloc(chains * sizeof *heads);
    for (long c = 0; c < chains; c++) {
      uint64_t *prev = NULL, *head = NULL;
      for (long k = 0; k < chain && c * chain + k < n; k++) {
        uint64_t *b = malloc(size);
        memset(b, (int)(c + k), size);
        b[0] = 0;
        if (size >= 16) b[1] = (uint64_t)prev;
        if (prev) prev[0] = (uint64_t)b;
        else head = b;
        prev = b;
      }
      if (c % 1024 != 1023) heads[kept++] = head;
    }
    uint64_t rnd = 88172645463325252ull;
    for (long i = kept - 1; i > 0; i--) {
      rnd ^= rnd << 13, rnd ^= rnd >> 7, rnd ^= rnd << 17;
      long j = (long)(rnd % (uint64_t)(i + 1));
      void *t = heads[i];
      heads[i] = heads[j], heads[j] = t;
    }
  }
  printf("ready %d\n", getpid());
  fflush(stdout);
  for (;;) pause();
}

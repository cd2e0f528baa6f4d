/* A 1 GiB heap of 4 KB blocks (262,144), all touched and reachable from one array.
 * Prints "ready PID" and waits. Usage: big_heap [MiB] */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
int main(int argc, char **argv) {
  long mib = argc > 1 ? atol(argv[1]) : 1024;
  long n = mib * 256;
  char **blocks = malloc(n * sizeof *blocks);
  for (long i = 0; i < n; i++) {
    blocks[i] = malloc(4096);
    memset(blocks[i], (int)i, 4096);
  }
  printf("ready %d\n", getpid());
  fflush(stdout);
  for (;;) pause();
}

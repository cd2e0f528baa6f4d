/* Leaks at a steady rate in wall-clock time: RATE bytes a second (argv[1], default 4 MiB)
 * in blocks of BLOCK bytes (argv[2], default 64 KiB), each written and its only pointer
 * overwritten, up to MAX bytes in all (argv[3], default no end; the last block is then lost too). The amount is computed from CLOCK_MONOTONIC, so a pause (a check's
 * snapshot, a loaded machine) is caught up at once and the long-run rate stays exact.
 * Prints "ready PID", then (with a fourth argument "wait": once a line comes on stdin) runs
 * until killed. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
void *volatile sink;
static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}
/* Not inlined: the pointer must not stay in one of main's registers. */
__attribute__((noinline)) static void leak(size_t n) {
  sink = malloc(n); /* @grow */
  memset(sink, 0x5a, n);
}
/* Zeroes the stack below the caller's frame, where stale copies of the last pointer lie
 * (the frames of usleep reuse that memory without writing every slot). */
__attribute__((noinline)) static void scrub(void) {
  volatile char b[8192];
  for (size_t i = 0; i < sizeof b; i++) b[i] = 0;
}
int main(int argc, char **argv) {
  double rate = argc > 1 ? atof(argv[1]) : 4 << 20;
  size_t block = argc > 2 ? strtoul(argv[2], 0, 0) : 64 << 10;
  double max = argc > 3 ? atof(argv[3]) : 1e300;
  printf("ready %d\n", getpid());
  fflush(stdout);
  if (argc > 4 && strcmp(argv[4], "wait") == 0) {
    char c;
    if (read(0, &c, 1) != 1) return 1;
  }
  double start = now();
  unsigned long long done = 0;
  for (;;) {
    double want = rate * (now() - start);
    if (want > max) want = max;
    while (done + block <= want) {
      leak(block);
      done += block;
      if (done + block > max) { /* the last block is lost too */
        sink = NULL;
        scrub();
      }
    }
    usleep(5000);
  }
}

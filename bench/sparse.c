/* A GIB-GiB (default 20) private anonymous mapping, MAP_NORESERVE, of which PAGES pages
 * (default 20) are touched, spread evenly; one of them holds the only pointer to a heap
 * block (reachable), and one heap block is leaked. Says "ready PID", then sleeps.
 * Usage: sparse GIB PAGES */
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>
int main(int argc, char **argv) {
  size_t gib = argc > 1 ? strtoul(argv[1], 0, 10) : 20;
  size_t pages = argc > 2 ? strtoul(argv[2], 0, 10) : 20;
  size_t len = gib << 30;
  char *m = mmap(NULL, len, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) {
    perror("mmap");
    return 1;
  }
  size_t step = (len / pages) & ~(size_t)4095; /* page-aligned: the pointer below is aligned */
  for (size_t i = 0; i < pages; i++) m[i * step] = 1;
  *(void **)(m + step) = malloc(100);
  void *volatile lost = malloc(200);
  lost = NULL;
  printf("ready %d\n", getpid());
  fflush(stdout);
  for (;;) sleep(1000);
}

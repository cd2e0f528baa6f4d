/* The kernel's cost of fork() per mapping (issue 9 scale, 2,000 threads: a snapshot fork
 * of a process with 2,000 threads copies ~8,000 mappings). Maps N separate 64 KiB regions
 * (each with a guard page, as thread stacks have: 2 mappings each, one page touched), then
 * times fork() in the parent (the child exits at once), median of R forks.
 * Usage: forkcost N R; prints "mappings M fork_us median". */
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
static double now_us(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}
static int cmp(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}
int main(int argc, char **argv) {
  int n = argc > 1 ? atoi(argv[1]) : 1000, r = argc > 2 ? atoi(argv[2]) : 15;
  for (int i = 0; i < n; i++) {
    char *p = mmap(NULL, 64 << 10, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return 1;
    mprotect(p, 4096, PROT_NONE); /* the guard: a second mapping */
    p[(64 << 10) - 1] = 1;        /* one touched page, as a sleeping thread's stack */
  }
  int maps = 0;
  FILE *f = fopen("/proc/self/maps", "r");
  for (int c; (c = fgetc(f)) != EOF;) maps += c == '\n';
  fclose(f);
  double *t = malloc(r * sizeof *t);
  for (int k = 0; k < r; k++) {
    double s = now_us();
    pid_t c = fork();
    if (c == 0) _exit(0);
    t[k] = now_us() - s;
    waitpid(c, NULL, 0);
  }
  qsort(t, r, sizeof *t, cmp);
  printf("mappings %d fork_us %.0f\n", maps, t[r / 2]);
  return 0;
}

/* Leaks at known sites for the output tests (pprof, flame graph, HTML, diff): leak_big
 * loses 6 blocks of 4096 bytes, leak_small 3 blocks of 100; 2 blocks of 64 stay reachable.
 * Then it says "ready PID" and, for each line "N" read on stdin, loses N more blocks of
 * 1000 bytes at grow() and answers "grew N"; it exits at the end of its input. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
void *volatile sink;
void *kept[2];
__attribute__((noinline)) void leak_big(void) {
  for (int i = 0; i < 6; i++) {
    sink = malloc(4096); /* @big */
    memset(sink, 1, 4096);
  }
}
__attribute__((noinline)) void leak_small(void) {
  for (int i = 0; i < 3; i++) {
    sink = malloc(100); /* @small */
    memset(sink, 2, 100);
  }
}
__attribute__((noinline)) void grow(int n) {
  for (int i = 0; i < n; i++) {
    sink = malloc(1000); /* @grow */
    memset(sink, 3, 1000);
  }
}
int main(void) {
  leak_big();
  leak_small();
  sink = NULL;
  for (int i = 0; i < 2; i++) kept[i] = malloc(64);
  printf("ready %d\n", getpid());
  fflush(stdout);
  char line[64];
  while (fgets(line, sizeof line, stdin)) {
    int n = atoi(line);
    grow(n);
    sink = NULL;
    printf("grew %d\n", n);
    fflush(stdout);
  }
  return 0;
}

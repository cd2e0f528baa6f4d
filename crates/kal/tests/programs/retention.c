/* glibc's own case: after one 2 MiB block is freed, glibc raises its mmap threshold, so
 * 150 later 2 MiB blocks come from the heap; all but the last are freed. RSS stays near
 * 300 MB with 2 MiB live. Says "ready PID" and waits. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
static char *blocks[150];
int main(void) {
  char *volatile first = malloc(2 << 20); /* volatile: gcc would delete a malloc/free pair */
  free(first);
  for (int i = 0; i < 150; i++) {
    blocks[i] = malloc(2 << 20);
    memset(blocks[i], i, 2 << 20);
  }
  for (int i = 0; i < 149; i++) free(blocks[i]);
  printf("ready %d\n", getpid());
  fflush(stdout);
  for (;;) pause();
}

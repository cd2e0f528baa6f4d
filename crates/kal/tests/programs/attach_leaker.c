/* Started without kal: leaks 1000 bytes and keeps two blocks, says "ready PID", waits for
 * a line on stdin (kal attach happens then), leaks 4321 bytes, frees one block from before
 * and reallocates the other (blocks the agent never recorded), says "after", waits for a
 * second line (kal check, kal detach) and ends with "done" and a checksum. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
void *volatile sink;
char *before_free, *before_realloc;
int main(void) {
  char line[64];
  sink = malloc(1000); /* @before_leak */
  memset(sink, 1, 1000);
  sink = NULL;
  before_free = malloc(200);
  before_realloc = malloc(300);
  memset(before_realloc, 7, 300);
  printf("ready %d\n", getpid());
  fflush(stdout);
  if (!fgets(line, sizeof line, stdin)) return 1;
  sink = malloc(4321); /* @after_leak */
  memset(sink, 2, 4321);
  sink = NULL;
  free(before_free);
  before_realloc = realloc(before_realloc, 100000);
  long sum = 0;
  for (int i = 0; i < 300; i++) sum += before_realloc[i];
  printf("after\n");
  fflush(stdout);
  if (!fgets(line, sizeof line, stdin)) return 1;
  free(before_realloc);
  printf("done %ld\n", sum);
  return 0;
}

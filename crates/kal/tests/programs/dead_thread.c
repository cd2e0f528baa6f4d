/* A thread leaks 10 blocks of 72 bytes, keeps a pointer to one of them in a local (deep
 * in its stack, where nothing the thread runs as it ends writes), and ends; the main thread joins it (its stack goes to glibc's cache of stacks, the stale
 * pointer with it), says "ready PID", then with the argument "wait" waits for ever (for a
 * check), else returns. memcheck: 10 blocks definitely lost. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
void *volatile sink;
static void *worker(void *a) {
  void *volatile kept[2048];
  for (int i = 0; i < 10; i++) {
    sink = malloc(72); /* @dead_leak */
    memset(sink, 0x5a, 72);
    if (i == 3) kept[0] = sink;
  }
  sink = NULL;
  (void)kept;
  return a;
}
int main(int argc, char **argv) {
  pthread_t t;
  pthread_create(&t, NULL, worker, NULL);
  pthread_join(t, NULL);
  printf("ready %d\n", getpid());
  fflush(stdout);
  if (argc > 1 && strcmp(argv[1], "wait") == 0)
    for (;;) pause();
  return 0;
}

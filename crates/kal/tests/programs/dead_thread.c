/* A thread leaks 10 blocks of 72 bytes, keeps a pointer to one of them in a local (deep
 * in its stack, where nothing the thread runs as it ends writes), and ends; the main
 * thread joins it (its stack goes to glibc's cache of stacks, the stale pointer with it).
 * A second thread returns a block of 100 bytes and ends without being joined: glibc keeps
 * that result in the thread's control block, at the top of its stack. Then the program
 * says "ready PID", and with the argument "wait" waits for ever (for a check), else
 * returns. memcheck: 10 blocks definitely lost; the result is still reachable. */
#define _GNU_SOURCE
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
static volatile pid_t giver_tid;
static void *giver(void *a) {
  (void)a;
  giver_tid = gettid();
  return malloc(100); /* @result */
}
/* Whether thread `tid` of this process has ended (its /proc entry is gone). */
static int ended(pid_t tid) {
  char path[64];
  snprintf(path, sizeof path, "/proc/self/task/%d", (int)tid);
  return access(path, F_OK) != 0;
}
int main(int argc, char **argv) {
  pthread_t t, g;
  pthread_create(&t, NULL, worker, NULL);
  pthread_join(t, NULL);
  pthread_create(&g, NULL, giver, NULL);
  while (giver_tid == 0 || !ended(giver_tid)) usleep(1000);
  printf("ready %d\n", getpid());
  fflush(stdout);
  if (argc > 1 && strcmp(argv[1], "wait") == 0)
    for (;;) pause();
  return 0;
}

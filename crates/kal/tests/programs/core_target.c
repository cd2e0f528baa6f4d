/* A known heap, then a stop: 4 lost lists of 2 blocks (4 direct 100-byte heads, each
 * with an indirect 40-byte tail), 3 reachable 300-byte blocks from a global, and a
 * second thread (its own arena) that keeps 2 blocks on its stack and loses 3 of 64 bytes.
 * Says "ready PID" when all is in place, then every thread waits in pause(). Leaks are
 * made in functions of their own and the stack below is scrubbed, so that no stale copy
 * of a lost pointer stays in a register or on a stack. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
void *kept[3];
void *volatile sink;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int done;

__attribute__((noinline)) static void scrub(void) {
  volatile char pad[8192];
  memset((char *)pad, 0, sizeof pad);
}

__attribute__((noinline)) static void lose_in_thread(void) {
  for (int i = 0; i < 3; i++) {
    sink = malloc(64); /* @core_thread_leak */
    memset(sink, 0x5a, 64);
  }
  sink = NULL;
}

static void *worker(void *arg) {
  (void)arg;
  void *volatile mine[2];
  for (int i = 0; i < 2; i++) mine[i] = malloc(200);
  lose_in_thread();
  scrub();
  pthread_mutex_lock(&mu);
  done = 1;
  pthread_cond_signal(&cv);
  pthread_mutex_unlock(&mu);
  for (;;) pause();
  return NULL;
}

__attribute__((noinline)) static void lose_lists(void) {
  for (int i = 0; i < 4; i++) {
    void **head = malloc(100); /* @core_leak */
    head[0] = malloc(40);
    sink = head;
  }
  sink = NULL;
}

int main(void) {
  lose_lists();
  scrub();
  for (int i = 0; i < 3; i++) kept[i] = malloc(300);
  pthread_t t;
  pthread_create(&t, NULL, worker, NULL);
  pthread_mutex_lock(&mu);
  while (!done) pthread_cond_wait(&cv, &mu);
  pthread_mutex_unlock(&mu);
  printf("ready %d\n", getpid());
  fflush(stdout);
  for (;;) pause();
}

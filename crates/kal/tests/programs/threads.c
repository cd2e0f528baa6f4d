/* Four threads leak ten blocks each at the same time. */
#include <pthread.h>
#include <stdlib.h>
#include "stop_point.h" /* with KAL_STOP set: "ready PID", then wait */
static pthread_barrier_t start;
void *volatile sink;
static void *worker(void *arg) {
  long id = (long)arg;
  pthread_barrier_wait(&start);
  for (int i = 0; i < 10; i++) {
    sink = malloc(100 + id); /* @thread_leak */
    for (int j = 0; j < 1000; j++) free(malloc(16 + j % 64));
  }
  return NULL;
}
int main(void) {
  pthread_t t[4];
  pthread_barrier_init(&start, NULL, 4);
  for (long i = 0; i < 4; i++) pthread_create(&t[i], NULL, worker, (void *)i);
  for (int i = 0; i < 4; i++) pthread_join(t[i], NULL);
  sink = NULL;
  stop_point();
  return 0;
}

/* Leaks 55 bytes, then ends the way argv[1] says:
 *   pthread_exit  the main thread calls pthread_exit; a worker leaks later and returns
 *   thread_exit   a worker calls exit(3) while the main thread waits in pthread_join */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
void *volatile sink;
static void *late_worker(void *a) {
  usleep(200000);
  sink = malloc(66); /* @late_leak */
  sink = NULL;
  return a;
}
static void *exiting_worker(void *a) {
  usleep(100000);
  exit(3);
  return a;
}
int main(int argc, char **argv) {
  sink = malloc(55); /* @main_leak */
  sink = NULL;
  pthread_t t;
  if (argc > 1 && strcmp(argv[1], "pthread_exit") == 0) {
    pthread_create(&t, NULL, late_worker, NULL);
    pthread_exit(NULL);
  }
  pthread_create(&t, NULL, exiting_worker, NULL);
  pthread_join(t, NULL);
  return 0;
}

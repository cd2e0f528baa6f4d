/* N threads (default 2000), each asleep in nanosleep; leaks one 64-byte block per thread
 * (the pointer dropped), keeps one per thread reachable from a global array; says
 * "ready PID" once all are running. Usage: threads N */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
static void **kept;
static void *sleeper(void *arg) {
  long i = (long)arg;
  void *volatile lost = malloc(64);
  lost = NULL;
  kept[i] = malloc(64);
  for (;;) sleep(1000);
  return NULL;
}
int main(int argc, char **argv) {
  long n = argc > 1 ? atol(argv[1]) : 2000;
  kept = calloc(n, sizeof(void *));
  pthread_attr_t a;
  pthread_attr_init(&a);
  pthread_attr_setstacksize(&a, 64 * 1024);
  for (long i = 0; i < n; i++) {
    pthread_t t;
    if (pthread_create(&t, &a, sleeper, (void *)i) != 0) {
      perror("pthread_create");
      return 1;
    }
  }
  sleep(1);
  printf("ready %d\n", getpid());
  fflush(stdout);
  for (;;) sleep(1000);
}

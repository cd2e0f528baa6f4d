/* Starts N threads (default 8) that each allocate and free once, waits until all have,
 * prints "maps M" (the number of lines of /proc/self/maps), then lets them end.
 * Usage: thread_maps N */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
static pthread_barrier_t ready, done;
static void *worker(void *arg) {
  (void)arg;
  free(malloc(100));
  pthread_barrier_wait(&ready);
  pthread_barrier_wait(&done);
  return NULL;
}
int main(int argc, char **argv) {
  int n = argc > 1 ? atoi(argv[1]) : 8;
  pthread_barrier_init(&ready, NULL, n + 1);
  pthread_barrier_init(&done, NULL, n + 1);
  pthread_t *t = malloc(n * sizeof *t);
  pthread_attr_t a;
  pthread_attr_init(&a);
  pthread_attr_setstacksize(&a, 64 * 1024);
  for (int i = 0; i < n; i++)
    if (pthread_create(&t[i], &a, worker, NULL) != 0) return 1;
  pthread_barrier_wait(&ready);
  int maps = 0;
  FILE *f = fopen("/proc/self/maps", "r");
  for (int c; (c = fgetc(f)) != EOF;) maps += c == '\n';
  fclose(f);
  printf("maps %d\n", maps);
  fflush(stdout);
  pthread_barrier_wait(&done);
  for (int i = 0; i < n; i++) pthread_join(t[i], NULL);
  free(t);
  return 0;
}

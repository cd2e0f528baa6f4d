/* Takes every pthread key the process can have (prints how many), then runs THREADS
 * short threads one after another; each leaks one 24-byte block and has a key destructor
 * that allocates after the thread's other destructors ran. Usage: keys_churn [THREADS] */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
void *volatile sink;
static pthread_key_t churn_key;
static void late(void *p) { free(p); free(malloc(40)); }
static void *worker(void *arg) {
  (void)arg;
  pthread_setspecific(churn_key, malloc(8));
  sink = malloc(24); /* @churn_leak */
  sink = NULL;
  return NULL;
}
/* Reuses the stack glibc cached from the last worker and wipes it: a stale copy of that
 * worker's pointer must not hide its leak (kal would scan the cached stack as memory). */
static void *scrub(void *arg) {
  volatile char wipe[256 * 1024];
  for (unsigned i = 0; i < sizeof wipe; i++) wipe[i] = 0;
  return arg;
}
int main(int argc, char **argv) {
  int threads = argc > 1 ? atoi(argv[1]) : 3000;
  static pthread_key_t keys[4096];
  int n = 0;
  while (n < 4096 && pthread_key_create(&keys[n], NULL) == 0) n++;
  printf("keys %d\n", n);
  fflush(stdout);
  for (int i = 0; i < n; i++) pthread_key_delete(keys[i]);
  pthread_key_create(&churn_key, late);
  for (int i = 0; i < threads; i++) {
    pthread_t t;
    if (pthread_create(&t, NULL, worker, NULL) != 0) return 1;
    pthread_join(t, NULL);
  }
  pthread_t t;
  pthread_create(&t, NULL, scrub, NULL);
  pthread_join(t, NULL);
  return 0;
}

/* Threads that ended and were joined leave their stacks in glibc's cache, with a stale
 * pointer to a block each leaked: memcheck (after __libc_freeres unmaps the cache) calls
 * those blocks definitely lost, 4 blocks of 48 bytes. */
#include <pthread.h>
#include <stdlib.h>
static void *worker(void *a) {
  void *volatile p = malloc(48); /* @thread_leak */
  (void)p;
  return a;
}
int main(void) {
  for (int i = 0; i < 4; i++) {
    pthread_t t;
    pthread_create(&t, NULL, worker, NULL);
    pthread_join(t, NULL);
  }
  return 0;
}

/* Leaks 5 blocks of 700 bytes, keeps 3 of 300, says "ready PID", then ticks on stdout
 * every 20 ms ("tick N") so a test can see that it keeps running. With -DNONDUMPABLE it
 * first makes itself non-dumpable (prctl), as programs holding secrets do. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#ifdef NONDUMPABLE
#include <sys/prctl.h>
#endif
void *kept[3];
void *volatile sink;
int main(void) {
#ifdef NONDUMPABLE
  prctl(PR_SET_DUMPABLE, 0);
#endif
  for (int i = 0; i < 5; i++) {
    sink = malloc(700); /* @live_leak */
    memset(sink, i, 700);
  }
  sink = NULL;
  for (int i = 0; i < 3; i++) kept[i] = malloc(300);
  printf("ready %d\n", getpid());
  fflush(stdout);
  for (long n = 0;; n++) {
    usleep(20000);
    printf("tick %ld\n", n);
    fflush(stdout);
  }
}

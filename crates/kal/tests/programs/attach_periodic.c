/* Started without kal: leaks 1000 bytes, says "ready PID", then every 20 ms leaks a
 * 4096-byte block (filled) until a line arrives on stdin; ends with "done N" (N leaks). */
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
void *volatile sink;
int main(void) {
  sink = malloc(1000);
  memset(sink, 1, 1000);
  sink = NULL;
  printf("ready %d\n", getpid());
  fflush(stdout);
  long n = 0;
  struct pollfd p = {0, POLLIN, 0};
  while (poll(&p, 1, 20) == 0) {
    sink = malloc(4096); /* @periodic_leak */
    memset(sink, 3, 4096);
    sink = NULL;
    n++;
  }
  printf("done %ld\n", n);
  return 0;
}

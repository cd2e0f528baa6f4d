/* Leaks 1000 bytes every 20 ms, says "ready PID", ticks on stdout.
 * "abort": calls abort() after about 1.5 s.
 * "vfork": at the first byte on stdin, vforks a child that sends SIGSEGV to this process,
 * whose only thread, waiting for the vfork child, cannot take it yet: the signal stays
 * pending until the child exits, at the next byte on stdin. Then the process dies of it.
 * Usage: crash abort|vfork */
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
void *volatile sink;
int main(int argc, char **argv) {
  int do_abort = argc > 1 && strcmp(argv[1], "abort") == 0;
  printf("ready %d\n", getpid());
  fflush(stdout);
  for (long t = 0;; t++) {
    sink = malloc(1000); /* @crash_leak */
    memset(sink, 3, 1000);
    struct pollfd in = {.fd = 0, .events = POLLIN};
    if (!do_abort && poll(&in, 1, 20) == 1) {
      char c;
      if (read(0, &c, 1) != 1) return 1;
      pid_t parent = getpid();
      if (vfork() == 0) {
        kill(parent, SIGSEGV);
        if (read(0, &c, 1) < 0) _exit(1);
        _exit(0);
      }
      printf("survived\n"); /* never: the pending SIGSEGV ends the process first */
      return 0;
    }
    if (do_abort) usleep(20000);
    printf("tick %ld\n", t);
    fflush(stdout);
    if (do_abort && t == 75) abort();
  }
}

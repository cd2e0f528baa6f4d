/* A daemon-style program that blocks SIGTERM and collects it from a signalfd: prints its
 * pid, waits for SIGTERM, prints "got TERM" and exits 0. Any thread that did not block
 * SIGTERM would let the default action kill the process instead. */
#include <signal.h>
#include <stdio.h>
#include <sys/signalfd.h>
#include <unistd.h>
int main(void) {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigprocmask(SIG_BLOCK, &set, NULL);
  int fd = signalfd(-1, &set, 0);
  printf("%d\n", getpid());
  fflush(stdout);
  struct signalfd_siginfo si;
  if (read(fd, &si, sizeof si) != sizeof si) return 1;
  printf("got %s\n", si.ssi_signo == SIGTERM ? "TERM" : "other");
  return 0;
}

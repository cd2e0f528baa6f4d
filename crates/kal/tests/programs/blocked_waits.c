/* Leaks one block of 123 bytes, says "ready PID", then waits: the main thread in
 * epoll_wait (on a pipe nobody writes, 60 s timeout), a second thread in sigtimedwait
 * (SIGUSR2, blocked, never sent; 60 s). Every early return with EINTR is printed at once
 * ("eintr epoll_wait" / "eintr sigtimedwait"), and each wait starts again. */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <time.h>
#include <unistd.h>
void *volatile sink;
static void *waiter(void *arg) {
  (void)arg;
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGUSR2);
  struct timespec ts = {60, 0};
  for (;;) {
    if (sigtimedwait(&set, NULL, &ts) < 0 && errno == EINTR) {
      printf("eintr sigtimedwait\n");
      fflush(stdout);
    }
  }
  return NULL;
}
int main(void) {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGUSR2);
  pthread_sigmask(SIG_BLOCK, &set, NULL);
  sink = malloc(123); /* @blocked_leak */
  memset(sink, 7, 123);
  sink = NULL;
  int fds[2];
  if (pipe(fds) != 0) return 1;
  int ep = epoll_create1(0);
  struct epoll_event ev = {.events = EPOLLIN};
  ev.data.fd = fds[0];
  epoll_ctl(ep, EPOLL_CTL_ADD, fds[0], &ev);
  pthread_t t;
  pthread_create(&t, NULL, waiter, NULL);
  usleep(100000); /* the waiter is in sigtimedwait by then */
  printf("ready %d\n", getpid());
  fflush(stdout);
  for (;;) {
    struct epoll_event out;
    if (epoll_wait(ep, &out, 1, 60000) < 0 && errno == EINTR) {
      printf("eintr epoll_wait\n");
      fflush(stdout);
    }
  }
}

/* Job control and signals under a tracer. A second thread ticks; the main thread prints
 * "ready PID", stops the whole process with raise(SIGSTOP) (a SIGCONT from outside wakes
 * it), then sends itself (this thread) 1,000 SIGUSR1 one after the other, each handled
 * before the next is sent, and prints "continued" and how many it handled. With "leak N",
 * it leaks N blocks of 100 bytes first; with "hold MS" it then runs MS milliseconds more
 * (checked meanwhile) before it prints; with "nostop 1" it does not stop itself. Exits 0. */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
void *volatile sink;
static volatile sig_atomic_t handled;
static volatile long ticks;
static void on_usr1(int s) {
  (void)s;
  handled++;
}
static void *ticker(void *a) {
  sigset_t all;
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, NULL);
  for (;;) {
    ticks++;
    usleep(1000);
  }
  return a;
}
static long long now_ms(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (long long)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}
int main(int argc, char **argv) {
  int leaks = 0, hold_ms = 0, nostop = 0;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (strcmp(argv[i], "leak") == 0)
      leaks = atoi(argv[i + 1]);
    if (strcmp(argv[i], "hold") == 0)
      hold_ms = atoi(argv[i + 1]);
    if (strcmp(argv[i], "nostop") == 0)
      nostop = atoi(argv[i + 1]);
  }
  for (int i = 0; i < leaks; i++) {
    sink = malloc(100); /* @stops_leak */
    sink = NULL;
  }
  signal(SIGUSR1, on_usr1);
  pthread_t t;
  pthread_create(&t, NULL, ticker, NULL);
  printf("ready %d\n", getpid());
  fflush(stdout);
  if (!nostop)
    raise(SIGSTOP);
  for (int i = 0; i < 1000; i++)
    pthread_kill(pthread_self(), SIGUSR1);
  long long until = now_ms() + hold_ms;
  while (now_ms() < until)
    usleep(1000);
  printf("continued\nhandled %d SIGUSR1\n", (int)handled);
  return 0;
}

/* Leaks N blocks of 64 bytes, says "ready PID", then spins measuring the longest gap
 * between iterations of its own loop; on SIGUSR1 it prints that worst stall (µs) and
 * exits. Usage: stall N */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
static volatile sig_atomic_t done;
static void on_usr1(int s) { (void)s; done = 1; }
static double now_us(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1e6 + t.tv_nsec / 1e3; }
void *volatile sink;
int main(int argc, char **argv) {
  long n = argc > 1 ? atol(argv[1]) : 100000;
  signal(SIGUSR1, on_usr1);
  for (long i = 0; i < n; i++) sink = malloc(64);
  sink = NULL;
  printf("ready %d\n", getpid());
  fflush(stdout);
  double last = now_us(), worst = 0;
  while (!done) {
    double t = now_us();
    if (t - last > worst) worst = t - last;
    last = t;
    free(malloc(32));
  }
  printf("worst stall %.0f us\n", worst);
  return 0;
}

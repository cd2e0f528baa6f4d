/* Leaks N blocks of SIZE bytes (default 64; filled with a compressible pattern, or random
 * bytes with a third argument "random"), says "ready PID", then spins measuring the gaps
 * between iterations of its own loop. On SIGUSR2 it reads one byte of every page of the
 * leaked blocks (through pointers it kept aside, XOR-ed so kal sees them as lost), timing
 * each read, and prints the slowest and the total. On SIGUSR1 it prints its three worst
 * stalls (µs, and when they began), then every stall over 500 µs ("stall BEGIN US"), and
 * exits. Usage: stall N [SIZE [random]] */
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
static volatile sig_atomic_t done, touch;
static void on_usr1(int s) { (void)s; done = 1; }
static void on_usr2(int s) { (void)s; touch = 1; }
static double now_us(void) { struct timespec t; clock_gettime(CLOCK_REALTIME, &t); return t.tv_sec * 1e6 + t.tv_nsec / 1e3; }
void *volatile sink;
/* Every stall over 500 µs: when it began, how long (printed at the end). */
#define LOG (1 << 16)
static double log_at[LOG], log_us[LOG];
static int logged;
#define KEY 0x6b6b6b6b6b6b6b6bUL
static uintptr_t *hidden;

static void touch_all(long n, size_t size) {
  double worst = 0, total = 0, slow = 0;
  long pages = 0, slow_reads = 0;
  volatile unsigned char x = 0;
  for (long i = 0; i < n; i++) {
    unsigned char *p = (unsigned char *)(hidden[i] ^ KEY);
    for (size_t off = 0; off < size; off += 4096) {
      double t = now_us();
      x += p[off];
      double d = now_us() - t;
      total += d;
      if (d > worst) worst = d;
      if (d > 5) { slow += d; slow_reads++; }
      pages++;
    }
  }
  printf("touched %ld pages in %.1f ms: %.2f us a page; %ld reads took > 5 us (faults: %.0f us each on average), slowest %.0f us\n",
         pages, total / 1e3, total / pages, slow_reads, slow_reads ? slow / slow_reads : 0, worst);
  fflush(stdout);
}

int main(int argc, char **argv) {
  long n = argc > 1 ? atol(argv[1]) : 100000;
  size_t size = argc > 2 ? (size_t)atol(argv[2]) : 64;
  int random_fill = argc > 3 && strcmp(argv[3], "random") == 0;
  signal(SIGUSR1, on_usr1);
  signal(SIGUSR2, on_usr2);
  hidden = calloc(n, sizeof *hidden);
  uint64_t seed = 88172645463325252ULL;
  for (long i = 0; i < n; i++) {
    unsigned char *p = malloc(size);
    if (size > 64) {
      if (random_fill) {
        for (size_t k = 0; k + 8 <= size; k += 8) {
          seed ^= seed << 13; seed ^= seed >> 7; seed ^= seed << 17;
          memcpy(p + k, &seed, 8);
        }
      } else {
        for (size_t k = 0; k < size; k++) p[k] = (unsigned char)(k % 61 + i);
      }
    }
    hidden[i] = (uintptr_t)p ^ KEY;
    sink = p;
  }
  sink = NULL;
  printf("ready %d\n", getpid());
  fflush(stdout);
  double last = now_us(), worst[3] = {0, 0, 0}, when[3] = {0, 0, 0};
  while (!done) {
    double t = now_us(), d = t - last;
    if (d > worst[2]) {
      worst[2] = d;
      when[2] = last;
      for (int k = 2; k > 0 && worst[k] > worst[k - 1]; k--) {
        double w = worst[k]; worst[k] = worst[k - 1]; worst[k - 1] = w;
        w = when[k]; when[k] = when[k - 1]; when[k - 1] = w;
      }
    }
    if (d > 500 && logged < LOG) {
      log_at[logged] = last;
      log_us[logged++] = d;
    }
    last = t;
    free(malloc(32));
    if (touch) {
      touch = 0;
      touch_all(n, size);
      last = now_us();
    }
  }
  printf("worst stall %.0f us (then %.0f, %.0f)\n", worst[0], worst[1], worst[2]);
  printf("stalls began at (unix s): %.3f %.3f %.3f\n", when[0] / 1e6, when[1] / 1e6, when[2] / 1e6);
  for (int i = 0; i < logged; i++) printf("stall %.6f %.0f\n", log_at[i] / 1e6, log_us[i]);
  return 0;
}

/* Two blocks whose only pointers the kernel holds: one travels through a pipe (written,
 * read back and checked, written again, every 150 ms), the other is the alternate signal
 * stack (sigaltstack), whose canary is checked after a SIGUSR1 handled on it every
 * 150 ms. Runs argv[1] seconds; prints "hidden ok" or CORRUPT. */
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define PIPED (64 * 1024)
#define ALT (256 * 1024)
#define CANARY (128 * 1024)
static volatile int on_alt, handled;

static void on_usr1(int sig) {
  stack_t ss;
  volatile char here;
  (void)sig;
  sigaltstack(NULL, &ss);
  on_alt = (char *)&here >= (char *)ss.ss_sp && (char *)&here < (char *)ss.ss_sp + ss.ss_size;
  handled++;
}

static int check(const unsigned char *p, size_t n, int k) {
  for (size_t i = 0; i < n; i++)
    if (p[i] != (unsigned char)(i * 5 + k)) {
      printf("CORRUPT %s at byte %zu\n", k ? "alt stack canary" : "piped block", i);
      return 0;
    }
  return 1;
}

int main(int argc, char **argv) {
  int secs = argc > 1 ? atoi(argv[1]) : 6;
  int fds[2];
  if (pipe(fds) != 0) return 2;
  unsigned char *p = malloc(PIPED); /* @piped_site */
  for (size_t i = 0; i < PIPED; i++) p[i] = (unsigned char)(i * 5);
  if (write(fds[1], &p, sizeof p) != sizeof p) return 2;
  p = 0;

  stack_t ss = {0};
  ss.ss_size = ALT;
  ss.ss_sp = malloc(ALT); /* @alt_site */
  /* The lower half is never used by signal frames: a canary the kernel must keep. */
  for (size_t i = 0; i < CANARY; i++) ((unsigned char *)ss.ss_sp)[i] = (unsigned char)(i * 5 + 1);
  if (sigaltstack(&ss, NULL) != 0) return 2;
  explicit_bzero(&ss, sizeof ss);
  struct sigaction sa = {0};
  sa.sa_handler = on_usr1;
  sa.sa_flags = SA_ONSTACK;
  sigaction(SIGUSR1, &sa, NULL);

  int ok = 1;
  for (int round = 0; round < secs * 1000 / 150 && ok; round++) {
    usleep(150000);
    unsigned char *q = 0;
    if (read(fds[0], &q, sizeof q) != sizeof q) return 3;
    ok &= check(q, PIPED, 0);
    if (write(fds[1], &q, sizeof q) != sizeof q) return 3;
    q = 0;
    raise(SIGUSR1);
    if (!on_alt) {
      printf("CORRUPT handler not on the alternate stack\n");
      ok = 0;
    }
    stack_t cur;
    sigaltstack(NULL, &cur);
    ok &= check(cur.ss_sp, CANARY, 1);
    explicit_bzero(&cur, sizeof cur);
  }
  if (ok) printf("hidden ok (%d signals)\n", handled);
  return 0;
}

/* Keeps exactly one pointer to a 1000-byte block only in one hard-to-see place, chosen by
 * argv[1]:
 *   dontfork   a private anonymous page with MADV_DONTFORK (absent from a fork copy)
 *   bigdontfork  the same in a 1 MiB region (for a copy-limit gap)
 *   wipeonfork a private anonymous page with MADV_WIPEONFORK (zeros in a fork copy)
 *   shared     a MAP_SHARED|MAP_ANONYMOUS page ("/dev/zero (deleted)")
 *   readonly   a private anonymous page made read-only after the store
 *   memfd      a shared mapping of a memfd
 *   epoll      an epoll registration's data.ptr (the kernel holds it)
 *   timer      a POSIX timer's sigev_value.sival_ptr (the kernel holds it)
 * With argv[3] = "leak", also leaks 777 bytes for real (@hidden_leak). Says "ready PID",
 * then every 10 ms fetches the pointer back from its place and checks the block's
 * pattern, printing CORRUPT on a mismatch; ends after argv[2] seconds (0: never) with
 * "hidden ok". Checks run in their own frames, so no pointer stays live on the stack. */
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define SIZE 1000
#define SLOT 64 /* word index of the pointer inside its page */

static const char *mode;
static void *volatile *place; /* the page holding the pointer (not the pointer) */
static int epfd = -1;
static int bad;

static unsigned char pattern(int i) { return (unsigned char)(i * 7 + 3); }

__attribute__((noinline)) static void check(unsigned char *b) {
  if (!b) {
    bad = 1;
    return;
  }
  for (int i = 0; i < SIZE; i++)
    if (b[i] != pattern(i)) {
      bad = 1;
      return;
    }
}

/* A page mapped with `flags`, with the pointer stored at SLOT. */
__attribute__((noinline)) static void store_in_page(size_t len, int flags, int fd, int advice) {
  void **page = mmap(NULL, len, PROT_READ | PROT_WRITE, flags, fd, 0);
  if (page == MAP_FAILED) {
    perror("mmap");
    exit(2);
  }
  if (advice >= 0 && madvise(page, len, advice) != 0) {
    perror("madvise");
    exit(2);
  }
  unsigned char *volatile b = malloc(SIZE);
  for (int i = 0; i < SIZE; i++) b[i] = pattern(i);
  ((void *volatile *)page)[SLOT] = b;
  b = NULL;
  place = (void *volatile *)page;
  if (strcmp(mode, "readonly") == 0) mprotect(page, len, PROT_READ);
}

__attribute__((noinline)) static void store_in_epoll(void) {
  int ev = eventfd(1, 0); /* always readable: epoll_wait returns it at once */
  epfd = epoll_create1(0);
  struct epoll_event e;
  memset(&e, 0, sizeof e);
  e.events = EPOLLIN;
  unsigned char *volatile b = malloc(SIZE);
  for (int i = 0; i < SIZE; i++) b[i] = pattern(i);
  *(void *volatile *)&e.data.ptr = b;
  b = NULL;
  if (epoll_ctl(epfd, EPOLL_CTL_ADD, ev, &e) != 0) {
    perror("epoll_ctl");
    exit(2);
  }
  memset((void *volatile)&e, 0, sizeof e);
}

__attribute__((noinline)) static void store_in_timer(void) {
  sigset_t s;
  sigemptyset(&s);
  sigaddset(&s, SIGRTMIN);
  sigprocmask(SIG_BLOCK, &s, NULL);
  struct sigevent sev;
  memset(&sev, 0, sizeof sev);
  sev.sigev_notify = SIGEV_SIGNAL;
  sev.sigev_signo = SIGRTMIN;
  unsigned char *volatile b = malloc(SIZE);
  for (int i = 0; i < SIZE; i++) b[i] = pattern(i);
  *(void *volatile *)&sev.sigev_value.sival_ptr = b;
  b = NULL;
  timer_t t;
  if (timer_create(CLOCK_MONOTONIC, &sev, &t) != 0) {
    perror("timer_create");
    exit(2);
  }
  memset((void *volatile)&sev, 0, sizeof sev);
  struct itimerspec its = {{0, 10000000}, {0, 10000000}};
  timer_settime(t, 0, &its, NULL);
}

__attribute__((noinline)) static void verify(void) {
  if (place) {
    check(place[SLOT]);
  } else if (epfd >= 0) {
    struct epoll_event e[1];
    if (epoll_wait(epfd, e, 1, 1000) == 1)
      check(e[0].data.ptr);
    else
      bad = 1;
    memset((void *volatile)e, 0, sizeof e);
  } else {
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, SIGRTMIN);
    siginfo_t si;
    if (sigwaitinfo(&s, &si) == SIGRTMIN)
      check(si.si_value.sival_ptr);
    else
      bad = 1;
    memset((void *volatile)&si, 0, sizeof si);
  }
}

__attribute__((noinline)) static void leak(void) {
  void *volatile p = malloc(777); /* @hidden_leak */
  memset(p, 1, 777);
  p = NULL;
}

int main(int argc, char **argv) {
  mode = argc > 1 ? argv[1] : "dontfork";
  int seconds = argc > 2 ? atoi(argv[2]) : 0;
  const int anon = MAP_PRIVATE | MAP_ANONYMOUS;
  if (strcmp(mode, "dontfork") == 0)
    store_in_page(4096, anon, -1, MADV_DONTFORK);
  else if (strcmp(mode, "bigdontfork") == 0)
    store_in_page(1 << 20, anon, -1, MADV_DONTFORK);
  else if (strcmp(mode, "wipeonfork") == 0)
    store_in_page(4096, anon, -1, MADV_WIPEONFORK);
  else if (strcmp(mode, "shared") == 0)
    store_in_page(4096, MAP_SHARED | MAP_ANONYMOUS, -1, -1);
  else if (strcmp(mode, "readonly") == 0)
    store_in_page(4096, anon, -1, -1);
  else if (strcmp(mode, "memfd") == 0) {
    int fd = memfd_create("kal-roots", 0);
    if (fd < 0 || ftruncate(fd, 4096) != 0) {
      perror("memfd");
      return 2;
    }
    store_in_page(4096, MAP_SHARED, fd, -1);
  } else if (strcmp(mode, "epoll") == 0)
    store_in_epoll();
  else if (strcmp(mode, "timer") == 0)
    store_in_timer();
  else {
    fprintf(stderr, "unknown mode %s\n", mode);
    return 2;
  }
  if (argc > 3 && strcmp(argv[3], "leak") == 0) leak();
  printf("ready %d\n", getpid());
  fflush(stdout);
  for (long n = 0; seconds == 0 || n < seconds * 100L; n++) {
    verify();
    if (bad) {
      printf("CORRUPT (%s)\n", mode);
      fflush(stdout);
      return 1;
    }
    usleep(10000);
  }
  printf("hidden ok\n");
  return 0;
}

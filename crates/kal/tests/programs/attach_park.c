/* Started without kal: leaks a 1000-byte block and hides a 40008-byte one (its address
 * kept only XOR-ed: it looks lost, but the program reads it at every "verify"; both from
 * before any attach, so kal must never reclaim either) and keeps 4 live blocks, says "ready PID", then answers lines on stdin:
 *   "leak":   allocates GROUPS groups of one live 40000-byte block (its own pattern,
 *             kept) followed by three leaked 40000-byte blocks (filled): adjacent leaked
 *             chunks, so whole pages holding glibc chunk headers lie between them (kal
 *             parks those pages); says "leaked N" (N leaked blocks since the start).
 *   "verify": checks every live block's pattern, frees the oldest live block from after
 *             the attach and allocates a new one (glibc reads and writes the headers of
 *             its neighbours, next to parked pages), allocates and frees a few small
 *             blocks; says "ok N" (N live blocks checked) or "CORRUPT ...".
 *   "stop":   checks and frees everything live, says "done N" (N checks that passed).
 * Nothing it still uses may ever read a wrong byte. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <unistd.h>

#define GROUPS 4
#define SIZE 40000
#define MAXLIVE 1024

void *volatile sink;
static unsigned char *live[MAXLIVE];
static size_t live_len[MAXLIVE];
static int nlive;
static long serial;
static uintptr_t hidden; /* the 40008-byte block from before, XOR-ed */
#define MASK ((uintptr_t)0x5a5a5a5a5a5a5a5aULL)

static unsigned char pattern(long s, size_t i) { return (unsigned char)(s * 31 + i * 7 + 1); }

/* A live block of `len` bytes filled with serial `s`'s pattern; its first word holds s. */
static void keep(size_t len) {
  unsigned char *p = malloc(len);
  long s = ++serial;
  for (size_t i = 0; i < len; i++) p[i] = pattern(s, i);
  memcpy(p, &s, sizeof s);
  live[nlive] = p;
  live_len[nlive++] = len;
}

/* Zeroes the stack below the caller's frame, where stale copies of the last pointer lie
 * (the frames of fgets reuse that memory without writing every slot). */
__attribute__((noinline)) static void scrub(void) {
  volatile char b[8192];
  for (size_t i = 0; i < sizeof b; i++) b[i] = 0;
}

static int check(int i) {
  long s;
  memcpy(&s, live[i], sizeof s);
  for (size_t j = sizeof s; j < live_len[i]; j++)
    if (live[i][j] != pattern(s, j)) {
      printf("CORRUPT live block %d (serial %ld) at byte %zu: %u\n", i, s, j, live[i][j]);
      fflush(stdout);
      return 0;
    }
  return 1;
}

int main(void) {
  char line[64];
  sink = malloc(1000); /* @before_small */
  memset(sink, 1, 1000);
  sink = malloc(40008); /* @before_big */
  memset(sink, 2, 40008);
  hidden = (uintptr_t)sink ^ MASK;
  sink = NULL;
  for (int i = 0; i < 4; i++) keep(100 + 50 * i);
  long leaked = 0, passed = 0;
  printf("ready %d\n", getpid());
  fflush(stdout);
  int first_after = nlive;
  while (fgets(line, sizeof line, stdin)) {
    if (!strncmp(line, "leak", 4)) {
      for (int g = 0; g < GROUPS && nlive < MAXLIVE; g++) {
        keep(SIZE);
        for (int k = 0; k < 3; k++) {
          sink = malloc(SIZE); /* @after_leak */
          memset(sink, 0x5a, SIZE);
          leaked++;
        }
        sink = NULL;
      }
      printf("leaked %ld\n", leaked);
    } else if (!strncmp(line, "verify", 6)) {
      int ok = 1;
      for (int i = 0; i < nlive; i++) ok &= check(i);
      const unsigned char *h = (const unsigned char *)(hidden ^ MASK);
      for (int j = 0; j < 40008; j++)
        if (h[j] != 2) {
          printf("CORRUPT the block from before at byte %d: %u\n", j, h[j]);
          ok = 0;
          break;
        }
      if (!ok) return 2;
      int checked = nlive;
      if (nlive > first_after) {
        free(live[first_after]);
        memmove(&live[first_after], &live[first_after + 1], (nlive - first_after - 1) * sizeof live[0]);
        memmove(&live_len[first_after], &live_len[first_after + 1],
                (nlive - first_after - 1) * sizeof live_len[0]);
        nlive--;
        keep(SIZE);
      }
      for (int i = 0; i < 16; i++) {
        void *q = malloc(24 + 40 * i);
        memset(q, 9, 24 + 40 * i);
        free(q);
      }
      passed++;
      printf("ok %d\n", checked);
    } else if (!strncmp(line, "stop", 4)) {
      for (int i = 0; i < nlive; i++)
        if (!check(i)) return 2;
      for (int i = 0; i < nlive; i++) free(live[i]);
      printf("done %ld\n", passed + 1);
      fflush(stdout);
      return 0;
    }
    fflush(stdout);
    scrub();
  }
  return 1;
}

/* Leaks two 1 MiB blocks (each an mmapped chunk of 257 pages) filled with a known
 * pattern, keeping their addresses only XOR-ed (kal sees no pointer). Once the file
 * argv[1] exists (the test creates it after kal reported the blocks parked), it touches
 * them again: block 0 is read by the program, block 1 by the kernel (write(2) to a pipe).
 * Prints "touch ok", or CORRUPT on the first wrong byte; then lives 2 s more so that a
 * check sees the contradiction. With a second argument "fork", a forked child does the
 * touching instead (the parent restores everything before fork: the child does not
 * inherit the registrations). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define SIZE (1 << 20)
#define KEY 0x5a5a5a5a5a5a5a5aUL
static volatile uintptr_t hidden[2];

static unsigned char pattern(size_t i, int k) { return (unsigned char)(i * 7 + k * 13 + 1); }

static int verify(const unsigned char *p, int k) {
  for (size_t i = 0; i < SIZE; i++)
    if (p[i] != pattern(i, k)) {
      printf("CORRUPT block %d at byte %zu: %d != %d\n", k, i, p[i], pattern(i, k));
      return 0;
    }
  return 1;
}

/* One call site for both blocks. */
__attribute__((noinline)) static void leak_one(int k) {
  unsigned char *p = malloc(SIZE); /* @park_site */
  for (size_t i = 0; i < SIZE; i++) p[i] = pattern(i, k);
  hidden[k] = (uintptr_t)p ^ KEY;
}

int main(int argc, char **argv) {
  volatile int blocks = 2;
  for (int k = 0; k < blocks; k++) leak_one(k);
  printf("ready %d\n", getpid());
  fflush(stdout);
  while (access(argv[1], F_OK) != 0) usleep(50000);
  int forked = argc > 2 && strcmp(argv[2], "fork") == 0;
  pid_t child = forked ? fork() : 0;
  if (child > 0) {
    int st = 0;
    waitpid(child, &st, 0);
    sleep(2);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 1;
  }
  int ok = verify((unsigned char *)(hidden[0] ^ KEY), 0);
  /* The kernel reads block 1 (copy_from_user): a parked page must be restored for it. */
  int fds[2];
  if (pipe(fds) != 0) return 2;
  unsigned char *b1 = (unsigned char *)(hidden[1] ^ KEY);
  unsigned char buf[4096];
  for (size_t off = 0; off < SIZE && ok; off += sizeof buf) {
    if (write(fds[1], b1 + off, sizeof buf) != sizeof buf) {
      printf("CORRUPT write(2) from block 1 failed\n");
      ok = 0;
      break;
    }
    if (read(fds[0], buf, sizeof buf) != sizeof buf) return 3;
    for (size_t i = 0; i < sizeof buf; i++)
      if (buf[i] != pattern(off + i, 1)) {
        printf("CORRUPT block 1 at byte %zu\n", off + i);
        ok = 0;
        break;
      }
  }
  if (ok) printf("touch ok%s\n", forked ? " (in a forked child)" : "");
  fflush(stdout);
  if (forked) _exit(ok ? 0 : 1);
  sleep(2);
  return 0;
}

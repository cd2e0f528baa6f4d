/* A parked block the program frees (its pointer was only hidden), then a new block at
 * what is likely the same address, leaked and parked in turn, then read back. Usage:
 * park_reuse FLAG1 FLAG2 (waits for each file before going on). Prints "reuse ok" (and
 * whether the address was reused) or CORRUPT. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define SIZE (1 << 20)
#define KEY 0x4d4d4d4d4d4d4d4dUL
static volatile uintptr_t hidden;

static void wait_for(const char *f) {
  while (access(f, F_OK) != 0) usleep(50000);
}

__attribute__((noinline)) static void leak_first(void) {
  unsigned char *p = malloc(SIZE); /* @first_site */
  memset(p, 0x11, SIZE);
  hidden = (uintptr_t)p ^ KEY;
}

__attribute__((noinline)) static void leak_second(void) {
  unsigned char *p = malloc(SIZE); /* @second_site */
  for (size_t i = 0; i < SIZE; i++) p[i] = (unsigned char)(i * 3 + 5);
  hidden = (uintptr_t)p ^ KEY;
}

int main(int argc, char **argv) {
  leak_first();
  uintptr_t first = hidden ^ KEY;
  printf("ready %d\n", getpid());
  fflush(stdout);
  wait_for(argv[1]);
  free((void *)(hidden ^ KEY)); /* parked: glibc reads its header, then unmaps it */
  leak_second();
  int reused = (hidden ^ KEY) == first;
  first = 0;
  wait_for(argv[2]);
  const unsigned char *p = (const unsigned char *)(hidden ^ KEY);
  for (size_t i = 0; i < SIZE; i++)
    if (p[i] != (unsigned char)(i * 3 + 5)) {
      printf("CORRUPT at byte %zu\n", i);
      return 1;
    }
  printf("reuse ok (address %s)\n", reused ? "reused" : "not reused");
  fflush(stdout);
  sleep(1);
  return 0;
}

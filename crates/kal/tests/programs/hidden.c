/* Hides a pointer from any scanner (XOR-masked), so kal finds the block lost and reclaims
 * it; then frees it: a contradiction. kal must not free it twice, and must never reclaim
 * from that site again. Usage: hidden SECONDS_TO_WAIT */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#define MASK 0x5a5a5a5a5a5a5a5aull
static uintptr_t hidden[4];
__attribute__((noinline)) static void *hide_me(void) { return malloc(100); } /* @hidden_site */
int main(int argc, char **argv) {
  int wait = argc > 1 ? atoi(argv[1]) : 3;
  hidden[0] = (uintptr_t)hide_me() ^ MASK;
  sleep(wait);                       /* kal reclaims it meanwhile */
  free((void *)(hidden[0] ^ MASK));  /* the contradiction */
  for (int i = 1; i < 4; i++) hidden[i] = (uintptr_t)hide_me() ^ MASK;
  sleep(wait);                       /* the site is banned: these stay */
  for (int i = 1; i < 4; i++) free((void *)(hidden[i] ^ MASK));
  printf("hidden ok\n");
  return 0;
}

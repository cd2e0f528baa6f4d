/* A block kal sees as lost (its address kept XOR-ed) that a thread keeps writing: every
 * round stamps each page with the round number, then checks every stamp. Parking races
 * these writes (write protection, copy, drop): not one write may be lost. Runs argv[1]
 * seconds; prints "race ok" or CORRUPT. */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#define PAGES 1024
#define KEY 0x3c3c3c3c3c3c3c3cUL
static volatile uintptr_t hidden;
static volatile int stop, bad;
static volatile long rounds;

static void *writer(void *arg) {
  (void)arg;
  for (uint64_t r = 1; !stop && !bad; r++) {
    volatile uint64_t *p = (volatile uint64_t *)(hidden ^ KEY);
    for (int i = 0; i < PAGES; i++) p[i * 512] = r;
    for (int i = 0; i < PAGES; i++)
      if (p[i * 512] != r) {
        printf("CORRUPT page %d: %lu != %lu\n", i, (unsigned long)p[i * 512], (unsigned long)r);
        bad = 1;
        break;
      }
    rounds = r;
    usleep(1000);
  }
  return 0;
}

int main(int argc, char **argv) {
  int secs = argc > 1 ? atoi(argv[1]) : 5;
  hidden = (uintptr_t)malloc(PAGES * 4096) ^ KEY; /* @race_site */
  pthread_t t;
  pthread_create(&t, 0, writer, 0);
  sleep(secs);
  stop = 1;
  pthread_join(t, 0);
  if (!bad) printf("race ok (%ld rounds)\n", rounds);
  return 0;
}

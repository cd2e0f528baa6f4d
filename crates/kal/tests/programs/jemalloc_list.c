/* A singly linked list of 10,000 8-byte nodes (each node is malloc(8) holding only the
 * next pointer; the head is a global), for a run under LD_PRELOAD of jemalloc, which hands
 * out 8-byte blocks 8 bytes apart.
 *
 * jemalloc_list            build the list, walk it once, exit (list still reachable)
 * jemalloc_list SECONDS    also re-walk the list for SECONDS, checking each round that it
 *                          still has 10,000 nodes with the same address checksum, while
 *                          churning 8-byte blocks through malloc/free (a node freed behind
 *                          the program's back would be handed out and overwritten)
 *
 * Exits 3 if jemalloc is not the allocator, 4 if the list ever changed. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define NODES 10000

struct node {
  struct node *next;
};

struct node *head;

static uint64_t mix(uint64_t h, uint64_t x) {
  h ^= x;
  h *= 0x100000001b3ULL;
  return h ^ (h >> 29);
}

/* Node count and address checksum; at most NODES + 1 steps even if the list is corrupt. */
static uint64_t walk(long *count) {
  uint64_t h = 0xcbf29ce484222325ULL;
  long n = 0;
  for (struct node *p = head; p && n <= NODES; p = p->next) {
    h = mix(h, (uint64_t)(uintptr_t)p);
    n++;
  }
  *count = n;
  return h;
}

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
  int (*mallctl)(const char *, void *, size_t *, void *, size_t) =
      (int (*)(const char *, void *, size_t *, void *, size_t))dlsym(RTLD_DEFAULT, "mallctl");
  const char *version = NULL;
  size_t len = sizeof version;
  if (!mallctl || mallctl("version", &version, &len, NULL, 0) != 0) {
    fprintf(stderr, "jemalloc is not loaded\n");
    return 3;
  }
  struct node *tail = NULL;
  for (int i = 0; i < NODES; i++) {
    struct node *n = malloc(8); /* @jl_node */
    n->next = NULL;
    if (tail)
      tail->next = n;
    else
      head = n;
    tail = n;
  }
  tail = NULL;
  long count;
  uint64_t sum = walk(&count);
  if (count != NODES) return 4;
  double seconds = argc > 1 ? atof(argv[1]) : 0;
  double end = now() + seconds;
  long rounds = 0;
  static void *churn[1000];
  while (now() < end) {
    for (int i = 0; i < 1000; i++) {
      churn[i] = malloc(8);
      memset(churn[i], 0xa5, 8);
    }
    for (int i = 0; i < 1000; i++) free(churn[i]);
    memset(churn, 0, sizeof churn);
    long c;
    if (walk(&c) != sum || c != NODES) {
      printf("list corrupted in round %ld: %ld nodes\n", rounds, c);
      return 4;
    }
    rounds++;
    struct timespec ts = {0, 2000000};
    nanosleep(&ts, NULL);
  }
  printf("jemalloc %s: %d nodes, checksum held for %ld rounds\n", version, NODES, rounds);
  return 0;
}

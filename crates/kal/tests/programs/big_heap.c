/* A large live heap (N blocks of 96 bytes in a linked list, default 400000: ~50 MiB) that
 * leaks 64 bytes every 10 ms until a byte arrives on stdin, then exits: each check of it
 * costs kal a lot of CPU. Usage: big_heap [N] */
#include <poll.h>
#include <stdlib.h>
#include <string.h>
struct node { struct node *next; char pad[88]; };
struct node *head;
void *volatile sink;
int main(int argc, char **argv) {
  long n = argc > 1 ? atol(argv[1]) : 400000;
  for (long i = 0; i < n; i++) {
    struct node *x = malloc(sizeof *x);
    memset(x->pad, 1, sizeof x->pad);
    x->next = head;
    head = x;
  }
  struct pollfd in = {.fd = 0, .events = POLLIN};
  while (poll(&in, 1, 10) == 0) sink = malloc(64); /* @big_leak */
  sink = NULL;
  return 0;
}

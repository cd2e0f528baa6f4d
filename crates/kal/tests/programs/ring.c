/* A ring of 5 nodes with no way in, and a ring of 3 held by a global. */
#include <stdlib.h>
#include "stop_point.h" /* with KAL_STOP set: "ready PID", then wait */
struct ring { struct ring *next; long pad[4]; };
struct ring *held;
static struct ring *make_ring(int n) {
  struct ring *first = malloc(sizeof *first); /* @ring */
  struct ring *cur = first;
  for (int i = 1; i < n; i++) { cur->next = malloc(sizeof *cur); cur = cur->next; } /* @ringrest */
  cur->next = first;
  return first;
}
int main(void) {
  held = make_ring(3);
  struct ring *lost = make_ring(5);
  lost = NULL;
  stop_point();
  return lost != NULL;
}

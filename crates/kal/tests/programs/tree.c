/* A tree of 15 nodes kept in a global; one subtree of 3 nodes is detached. */
#include <stdlib.h>
#include "stop_point.h" /* with KAL_STOP set: "ready PID", then wait */
struct node { struct node *l, *r; long pad[4]; };
struct node *root;
static struct node *mk(int depth) {
  struct node *n = calloc(1, sizeof *n); /* @node */
  if (depth > 0) { n->l = mk(depth - 1); n->r = mk(depth - 1); }
  return n;
}
int main(void) {
  root = mk(3);
  root->l->r = NULL; /* 3 nodes lost: 1 direct, 2 indirect */
  stop_point();
  return 0;
}

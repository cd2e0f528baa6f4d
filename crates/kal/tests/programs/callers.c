/* One allocating function reached from two callers at the same stack depth, alternately:
 * the agent's recent-stack cache must tell the two stacks apart. */
#include <stdlib.h>
void *volatile sink;
__attribute__((noinline)) static void *alloc_here(int n) { return malloc(n); } /* @alloc_here */
__attribute__((noinline)) static void *from_a(void) { return alloc_here(10); } /* @from_a */
__attribute__((noinline)) static void *from_b(void) { return alloc_here(10); } /* @from_b */
int main(void) {
  for (int i = 0; i < 5; i++) {
    sink = from_a();
    sink = from_b();
  }
  sink = NULL;
  return 0;
}

/* Defines its own malloc family (a bump allocator over a static arena) and leaks from it:
 * these allocations never reach the C library, so kal must say it does not track them. */
#include <stddef.h>
#include <string.h>
static char arena[1 << 20];
static size_t used;
void *malloc(size_t n) {
  n = (n + 15) & ~(size_t)15;
  if (used + n > sizeof arena) return NULL;
  void *p = arena + used;
  used += n;
  return p;
}
void free(void *p) { (void)p; }
void *calloc(size_t n, size_t s) { void *p = malloc(n * s); if (p) memset(p, 0, n * s); return p; }
void *realloc(void *p, size_t n) { void *q = malloc(n); if (q && p) memcpy(q, p, n); return q; }
void *volatile sink;
int main(void) {
  sink = malloc(100); /* @own_leak */
  sink = NULL;
  return 0;
}

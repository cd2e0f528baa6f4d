/* A leaked 64-byte owner (@owner_site, in function `vendor_make_owner`) that holds the only
 * pointer to a 32-byte child (@child_site), and an unrelated real leak of 500 bytes
 * (@other_leak). Suppressing `vendor_*` must hide the owner and keep its child from being
 * reported as an indirect leak, as LeakSanitizer does. */
#include <stdlib.h>
#include <string.h>
void *volatile sink;
__attribute__((noinline)) void make_child(void) {
  sink = malloc(32); /* @child_site */
  memset(sink, 2, 32);
}
/* Takes the child from `sink`: its only pointer is then inside the owner. */
__attribute__((noinline)) void vendor_make_owner(void) {
  void **o = malloc(64); /* @owner_site */
  memset(o, 0, 64);
  o[0] = sink;
  sink = o;
  sink = NULL;
}
__attribute__((noinline)) void other(void) {
  sink = malloc(500); /* @other_leak */
  sink = NULL;
}
int main(void) {
  make_child();
  vendor_make_owner();
  other();
  return 0;
}

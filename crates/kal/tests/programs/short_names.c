/* Functions whose names an Itanium demangler would misread as types: f (float), i (int),
 * d (double). Each leaks one block; the report must name the C functions as they are. */
#include <stdlib.h>
void *volatile keep;
__attribute__((noinline)) void f(void) { keep = malloc(11); /* @in_f */ keep = 0; }
__attribute__((noinline)) void i(void) { keep = malloc(22); /* @in_i */ keep = 0; }
__attribute__((noinline)) void d(void) { keep = malloc(33); /* @in_d */ keep = 0; }
int main(void) {
  f();
  i();
  d();
  return 0;
}

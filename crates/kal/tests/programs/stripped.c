/* Built without debug info and stripped by the tests: leaks 200 bytes every 20 ms for
 * about 1.5 s from a function main calls, then exits. */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
void *volatile sink;
__attribute__((noinline)) void *make_record(size_t n) {
  char *p = malloc(n);
  if (p) memset(p, 0x5a, n); /* not a tail call: the return address stays in here */
  return p;
}
int main(void) {
  for (int i = 0; i < 75; i++) {
    sink = make_record(200);
    usleep(20000);
  }
  sink = NULL;
  return 0;
}

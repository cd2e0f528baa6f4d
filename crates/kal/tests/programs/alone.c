/* Three 100-byte leaks at one line, for the test of a kal binary installed alone. */
#include <stdlib.h>
#include <string.h>
static void *keep;
int main(void) {
  for (int i = 0; i < 3; i++) {
    char *p = malloc(100); /* @alone_leak */
    memset(p, i, 100);
  }
  keep = malloc(50); /* still reachable */
  return 0;
}

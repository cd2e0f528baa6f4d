/* Leaks 100 bytes every 20 ms for about a second, then exits. */
#include <stdlib.h>
#include <unistd.h>
void *volatile sink;
int main(void) {
  for (int i = 0; i < 60; i++) {
    sink = malloc(100); /* @trickle */
    usleep(20000);
  }
  sink = NULL;
  return 0;
}

/* The classic: every 100 ms, malloc and memset 4,096,000 bytes and drop the pointer.
 * Usage: leak_loop SECONDS */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
int main(int argc, char **argv) {
  int secs = argc > 1 ? atoi(argv[1]) : 20;
  for (int i = 0; i < secs * 10; i++) {
    char *p = malloc(4096000); /* @loop_leak */
    memset(p, 1, 4096000);
    usleep(100000);
  }
  return 0;
}

/* Leaks 33 bytes, then execs itself; the new image leaks 44. */
#include <stdlib.h>
#include <unistd.h>
void *volatile sink;
int main(int argc, char **argv) {
  if (argc == 1) {
    sink = malloc(33);
    sink = NULL;
    execl("/proc/self/exe", argv[0], "again", (char *)NULL);
    return 1;
  }
  sink = malloc(44); /* @after_exec */
  sink = NULL;
  return 0;
}

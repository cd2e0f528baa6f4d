/* exit(argv[1]); leaks 9 bytes if argv[2] is "leak"; kills itself if argv[1] is "kill". */
#include <signal.h>
#include <stdlib.h>
#include <string.h>
void *volatile sink;
int main(int argc, char **argv) {
  if (argc > 2 && strcmp(argv[2], "leak") == 0) { sink = malloc(9); sink = NULL; }
  if (strcmp(argv[1], "kill") == 0) raise(SIGTERM);
  return atoi(argv[1]);
}

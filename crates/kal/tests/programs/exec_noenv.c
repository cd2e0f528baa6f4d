/* Leaks 33 bytes, then execs itself with an empty environment (so without kal's agent);
 * the new image leaks 44 bytes, says "again PID" and waits for a line on stdin. */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
void *volatile sink;
int main(int argc, char **argv) {
  if (argc == 1) {
    sink = malloc(33);
    sink = NULL;
    char *args[] = {argv[0], "again", NULL};
    char *env[] = {NULL};
    execve("/proc/self/exe", args, env);
    return 1;
  }
  sink = malloc(44);
  sink = NULL;
  printf("again %d\n", (int)getpid());
  fflush(stdout);
  char line[8];
  if (!fgets(line, sizeof line, stdin)) return 3;
  return 0;
}

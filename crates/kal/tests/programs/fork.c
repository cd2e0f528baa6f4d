/* The parent leaks 55 bytes, its forked child 77. */
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>
void *volatile sink;
int main(void) {
  sink = malloc(55); /* @parent */
  pid_t pid = fork();
  if (pid == 0) {
    sink = malloc(77); /* @child */
    sink = NULL;
    return 0;
  }
  waitpid(pid, NULL, 0);
  sink = NULL;
  return 0;
}

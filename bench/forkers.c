/* Forks N children (default 200) at once; each leaks ten 1,000-byte blocks and exits
 * (through exit, so at-exit handlers run); the parent waits for all of them and exits.
 * Usage: forkers N */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
int main(int argc, char **argv) {
  int n = argc > 1 ? atoi(argv[1]) : 200;
  for (int i = 0; i < n; i++) {
    pid_t p = fork();
    if (p < 0) {
      perror("fork");
      return 1;
    }
    if (p == 0) {
      for (int k = 0; k < 10; k++) {
        void *volatile b = malloc(1000);
        memset(b, k, 1000);
        b = NULL;
      }
      exit(0);
    }
  }
  int st, bad = 0;
  while (wait(&st) > 0)
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) bad++;
  return bad != 0;
}

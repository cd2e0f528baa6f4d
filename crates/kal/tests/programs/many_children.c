/* Forks N children (default 40) at once; child i leaks i % 5 + 1 blocks of 1000 bytes and
 * exits through exit(); each child first prints "child PID leaks K". The parent waits for
 * all of them and exits 0. Usage: many_children N */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
int main(int argc, char **argv) {
  int n = argc > 1 ? atoi(argv[1]) : 40;
  for (int i = 0; i < n; i++) {
    pid_t p = fork();
    if (p < 0) return 1;
    if (p == 0) {
      int k = i % 5 + 1;
      printf("child %d leaks %d\n", getpid(), k);
      fflush(stdout);
      for (int j = 0; j < k; j++) {
        void *volatile b = malloc(1000); /* @mc_leak */
        memset(b, j, 1000);
        b = NULL;
      }
      exit(0);
    }
  }
  int st, bad = 0;
  while (wait(&st) > 0) bad += !WIFEXITED(st) || WEXITSTATUS(st) != 0;
  return bad != 0;
}

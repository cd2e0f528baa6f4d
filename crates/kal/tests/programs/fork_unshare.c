/* Forks 4 children one after the other; each, first thing, calls unshare(CLONE_NEWUSER),
 * which the kernel allows only to a single-threaded process, prints the result and its
 * thread count, leaks 44 bytes and returns. The parent waits for each and returns 0. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

void *volatile sink;

static int threads(void) {
  DIR *d = opendir("/proc/self/task");
  int n = 0;
  struct dirent *e;
  while (d && (e = readdir(d)))
    n += e->d_name[0] != '.';
  if (d)
    closedir(d);
  return n;
}

int main(void) {
  int before = threads();
  for (int i = 0; i < 4; i++) {
    pid_t p = fork();
    if (p < 0)
      return 1;
    if (p == 0) {
      int r = unshare(CLONE_NEWUSER);
      int e = errno;
      printf("child %d: unshare %s, %s threads as its parent\n", i, r == 0 ? "ok" : strerror(e),
             threads() == before ? "as many" : "not as many");
      sink = malloc(44); /* @child_leak */
      sink = NULL;
      return 0;
    }
    int st;
    waitpid(p, &st, 0);
  }
  return 0;
}

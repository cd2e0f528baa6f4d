/* Daemonizes the classic way: the parent exits at once; the child, now an orphan, waits a
 * little, then execs itself as the daemon, which leaks 99 bytes and exits. */
#include <stdlib.h>
#include <unistd.h>
void *volatile sink;
int main(int argc, char **argv) {
  if (argc == 1) {
    if (fork() != 0) return 0; /* the parent returns to the shell */
    setsid();
    usleep(300000); /* the parent is gone: this process was adopted */
    execl("/proc/self/exe", argv[0], "daemon", (char *)NULL);
    return 1;
  }
  sink = malloc(99); /* @daemon_leak */
  sink = NULL;
  return 0;
}

/* Prints the mode of the directory of kal's socket, leaks 3 blocks of 77 bytes, then
 * waits until a line arrives on stdin (so that periodic checks happen meanwhile). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
void *volatile sink;
int main(void) {
  const char *s = getenv("KAL_SOCKET");
  if (s) {
    char dir[256];
    snprintf(dir, sizeof dir, "%s", s);
    char *slash = strrchr(dir, '/');
    if (slash) *slash = 0;
    struct stat st;
    if (stat(dir, &st) == 0) printf("sockdir %o %s\n", st.st_mode & 07777, s);
  }
  fflush(stdout);
  for (int i = 0; i < 3; i++) {
    sink = malloc(77); /* @peer_leak */
  }
  sink = NULL;
  char line[8];
  if (!fgets(line, sizeof line, stdin)) return 1;
  return 0;
}

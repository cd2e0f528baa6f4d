/* Built as a non-PIE executable whose code takes malloc's address: its dynamic symbol
 * becomes a canonical PLT entry, and dlsym(RTLD_DEFAULT, "malloc") returns this
 * executable's PLT stub, which jumps through the GOT slot kal attach redirects. Says
 * "ready PID", waits for a line (kal attach), then allocates and frees through the
 * pointer 20,000 times (freeing directly), leaks 777 bytes through it, says "after", waits for a line and
 * ends with "done". */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
void *(*volatile fp)(size_t);
void *volatile sink;
int main(void) {
  char line[64];
  fp = malloc; /* non-PIC code taking the address: a canonical PLT entry */
  printf("ready %d\n", getpid());
  fflush(stdout);
  if (!fgets(line, sizeof line, stdin)) return 1;
  for (int i = 0; i < 20000; i++) {
    char *p = fp(100 + i % 50);
    memset(p, i, 100);
    free(p);
  }
  sink = fp(777); /* @nopie_leak */
  memset(sink, 3, 777);
  sink = NULL;
  printf("after\n");
  fflush(stdout);
  if (!fgets(line, sizeof line, stdin)) return 1;
  printf("done\n");
  fflush(stdout);
  return 0;
}

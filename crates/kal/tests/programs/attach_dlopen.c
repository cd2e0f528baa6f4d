/* Started without kal: says "ready PID" and waits for a line (kal attach happens then);
 * then dlopens the library named by argv[1] by its bare name (found through this
 * executable's RUNPATH only: the loader must see this program as dlopen's caller), calls
 * its plugin_leak three times dropping the result, says "loaded" (or "dlopen failed: …"),
 * waits for a second line and ends with "done". */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
int main(int argc, char **argv) {
  char line[64];
  if (argc < 2) return 2;
  printf("ready %d\n", getpid());
  fflush(stdout);
  if (!fgets(line, sizeof line, stdin)) return 1;
  void *h = dlopen(argv[1], RTLD_NOW);
  if (!h) {
    printf("dlopen failed: %s\n", dlerror());
    fflush(stdout);
    return 1;
  }
  char *(*leak)(void) = (char *(*)(void))dlsym(h, "plugin_leak");
  for (int i = 0; i < 3; i++) leak();
  printf("loaded\n");
  fflush(stdout);
  if (!fgets(line, sizeof line, stdin)) return 1;
  free(leak());
  printf("done\n");
  return 0;
}

/* Loads ./libplugin.so (path in argv[1]) and drops what it allocates. */
#include <dlfcn.h>
#include <stdio.h>
int main(int argc, char **argv) {
  void *h = dlopen(argv[1], RTLD_NOW);
  if (!h) { fprintf(stderr, "%s\n", dlerror()); return 2; }
  char *(*leak)(void) = (char *(*)(void))dlsym(h, "plugin_leak");
  char *volatile p = leak();
  p = NULL;
  return 0;
}

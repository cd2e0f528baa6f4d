/* A library loaded with dlopen that leaks. */
#include <stdlib.h>
#include <string.h>
char *plugin_leak(void) {
  char *p = malloc(321); /* @plugin */
  memset(p, 1, 321);
  return p;
}

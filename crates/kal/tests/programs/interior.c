/* A block reached only through a pointer 40 bytes into it: possibly lost. */
#include <stdlib.h>
#include <string.h>
#include "stop_point.h" /* with KAL_STOP set: "ready PID", then wait */
char *inside;
int main(void) {
  char *p = malloc(200); /* @interior */
  memset(p, 0x5a, 200);
  inside = p + 40;
  p = NULL;
  stop_point();
  return 0;
}

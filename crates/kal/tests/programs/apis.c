/* Every allocation API leaks one block of a distinct size. */
#define _GNU_SOURCE
#include <malloc.h>
#include <stdlib.h>
#include "stop_point.h" /* with KAL_STOP set: "ready PID", then wait */
void *volatile sink;
void *out; /* posix_memalign's result goes here (not to a stack slot that outlives main) */
void *volatile nothing; /* stays NULL: keeps gcc from turning realloc(NULL) into malloc */
int main(void) {
  void *p;
  sink = malloc(11);                 /* @malloc */
  sink = calloc(3, 7);               /* @calloc */
  sink = realloc(nothing, 13);       /* @realloc_null */
  p = malloc(5);
  sink = realloc(p, 4000);           /* @realloc_grow */
  sink = reallocarray(nothing, 3, 5); /* @reallocarray */
  sink = memalign(64, 19);           /* @memalign */
  posix_memalign(&out, 32, 23);      /* @posix_memalign */
  sink = out;
  out = NULL;
  sink = aligned_alloc(16, 48);      /* @aligned_alloc */
  sink = valloc(29);                 /* @valloc */
  sink = pvalloc(31);                /* @pvalloc */
  p = malloc(64);
  free(p);                           /* freed: never reported */
  p = malloc(70);
  p = realloc(p, 0);                 /* realloc to 0 frees */
  sink = NULL;
  stop_point();
  return 0;
}

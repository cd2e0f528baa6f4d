/* A known point to stop at, for checks of a program started without kal: with KAL_STOP
 * set in the environment, stop_point() says "ready PID" and waits for ever (for
 * `kal check PID`); without it, it does nothing (no allocation, no output), so the
 * program behaves as it always has. */
#ifndef KAL_STOP_POINT_H
#define KAL_STOP_POINT_H
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
static void stop_point(void) {
  if (!getenv("KAL_STOP")) return;
  printf("ready %d\n", (int)getpid());
  fflush(stdout);
  for (;;) pause();
}
#endif

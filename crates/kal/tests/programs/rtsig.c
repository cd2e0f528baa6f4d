// Real-time signals through a tracer: 100 SIGRTMIN sent to itself and counted by a
// handler, then initgroups (glibc's internal setgroups reaches every thread with its own
// real-time signal, SIGSETXID, and waits for each). Prints what it saw; leaks 77 bytes.
#define _GNU_SOURCE
#include <grp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static volatile sig_atomic_t seen;
void *volatile sink;

static void on_rt(int sig) {
    (void)sig;
    seen++;
}

int main(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_rt;
    sigaction(SIGRTMIN, &sa, 0);
    union sigval v = {0};
    for (int i = 0; i < 100; i++) sigqueue(getpid(), SIGRTMIN, v);
    int r = initgroups("root", 0);
    printf("rt %d initgroups %d\n", (int)seen, r);
    sink = malloc(77); /* @leak */
    sink = 0;
    return 0;
}

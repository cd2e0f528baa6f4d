// A second thread queues 20,000 SIGRTMIN to the main thread (sigqueue, retried while the
// queue is full); the main thread counts them in a handler, allocating as it goes. Every
// queued real-time signal is delivered exactly once, so the count must be 20,000 — also
// when kal freezes the process for checks meanwhile. Prints "delivered N"; leaks 64 bytes.
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define N 20000
static volatile sig_atomic_t got;
static pid_t me;
void *volatile sink;

static void on_rt(int sig) {
    (void)sig;
    got++;
}

static void *sender(void *a) {
    union sigval v = {0};
    for (int i = 0; i < N; i++) {
        while (sigqueue(me, SIGRTMIN, v) != 0 && errno == EAGAIN) usleep(50);
        if (i % 50 == 0) usleep(1000);
    }
    return a;
}

int main(void) {
    me = getpid();
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_rt;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGRTMIN, &sa, 0);
    // Only the main thread takes the signal.
    pthread_t t;
    sigset_t rt;
    sigemptyset(&rt);
    sigaddset(&rt, SIGRTMIN);
    pthread_sigmask(SIG_BLOCK, &rt, 0);
    pthread_create(&t, 0, sender, 0);
    pthread_sigmask(SIG_UNBLOCK, &rt, 0);
    for (int spins = 0; got < N && spins < 400000; spins++) {
        sink = malloc(32);
        free(sink);
        usleep(50);
    }
    pthread_join(t, 0);
    usleep(200000);
    printf("delivered %d\n", (int)got);
    sink = malloc(64); /* @leak */
    sink = 0;
    return 0;
}

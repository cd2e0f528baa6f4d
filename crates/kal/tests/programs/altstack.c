// Signal handlers that allocate while the main loop allocates: SIGALRM runs on an
// alternate stack (sigaltstack, SA_ONSTACK), SIGPROF on whatever stack the thread is on.
// Each handler uses its own block size, so glibc's per-size caches never race (the
// program is correct without kal). Prints the same two lines on every correct run and
// leaks three 1000-byte blocks at @leak. Runs until each handler ran often
// (5000 and 50 times: SIGPROF counts CPU time), at most 30 s.
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

static volatile sig_atomic_t alrm, prof, bad;
static char altstack[1 << 16];
static void *volatile kept;

static void churn(size_t n, int tag) {
    unsigned char *p = malloc(n);
    if (!p) {
        bad = 1;
        return;
    }
    memset(p, tag, n);
    for (size_t i = 0; i < n; i += 61)
        if (p[i] != tag) bad = 1;
    free(p);
}

// Blocks the SIGALRM handler keeps (still reachable), each pointing to a 64-byte one: if
// a kept block went unrecorded, its 64-byte block would look lost.
static char **held[5];
static int nheld;

static void on_alrm(int sig) {
    (void)sig;
    churn(300, 0xa1);
    if (alrm % 1000 == 999 && nheld < 5) {
        char **b = malloc(300);
        if (b) b[0] = malloc(64);
        held[nheld++] = b;
    }
    alrm++;
}

static void on_prof(int sig) {
    (void)sig;
    churn(520, 0xb2);
    prof++;
}

int main(void) {
    stack_t ss = {.ss_sp = altstack, .ss_size = sizeof altstack};
    if (sigaltstack(&ss, 0)) return 2;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_alrm;
    sa.sa_flags = SA_ONSTACK | SA_RESTART;
    sigaction(SIGALRM, &sa, 0);
    sa.sa_handler = on_prof;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGPROF, &sa, 0);
    // Fill each size's cache before any signal can arrive (glibc keeps 7 of a size).
    void *warm[7][2];
    for (int i = 0; i < 7; i++) warm[i][0] = malloc(300), warm[i][1] = malloc(64);
    for (int i = 0; i < 7; i++) free(warm[i][0]), free(warm[i][1]);
    churn(520, 1);
    churn(32, 1);
    churn(48, 1);
    for (int i = 0; i < 3; i++) kept = malloc(1000); /* @leak */
    kept = 0;
    struct itimerval it = {{0, 50}, {0, 50}};
    setitimer(ITIMER_REAL, &it, 0);
    setitimer(ITIMER_PROF, &it, 0);
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    unsigned long rounds = 0;
    do {
        for (int k = 0; k < 1000; k++) {
            churn(32, 0x11);
            churn(48, 0x22);
        }
        rounds++;
        clock_gettime(CLOCK_MONOTONIC, &t);
    } while ((alrm < 5000 || prof < 50) && t.tv_sec - t0.tv_sec < 30);
    struct itimerval off = {{0, 0}, {0, 0}};
    setitimer(ITIMER_REAL, &off, 0);
    setitimer(ITIMER_PROF, &off, 0);
    fprintf(stderr, "rounds %lu alrm %d prof %d\n", rounds, (int)alrm, (int)prof);
    for (int i = 0; i < nheld; i++)
        if (!held[i] || !held[i][0]) bad = 1;
    printf("%s\n", bad ? "corrupt" : "blocks intact");
    printf("%s\n", alrm >= 5000 && prof >= 50 ? "handlers ran" : "handlers did not run");
    return 0;
}

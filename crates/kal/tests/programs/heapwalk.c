/* Heap churn for the agentless heap walk: many threads (more than glibc makes arenas on
 * this machine, so some share one), tcache and fastbin churn (many small blocks freed,
 * some by another thread than the one that made them), realloc growing and shrinking,
 * memalign and friends, big mmapped blocks (plain, memaligned, calloc'd, mremapped), and
 * threads that exit (their tcache is given back), threads whose tcache stays empty. Then every thread parks and the program
 * prints "ready PID": the heap stands still until it is killed. */
#include <malloc.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define PARKED 24
#define EXITING 6
#define GIVE 64
#define QUIET 2 /* threads that allocate once: their tcache stays empty */

static void *given[PARKED + EXITING + 1][GIVE];
static pthread_barrier_t phase;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static int parked;
static void *volatile sink[4096];
static int nsink;

static void keep(void *p) {
    pthread_mutex_lock(&lock);
    sink[nsink++ % 4096] = p;
    pthread_mutex_unlock(&lock);
}

static void churn(int id) {
    static const size_t sizes[] = {8, 24, 40, 56, 72, 100, 120, 200, 500, 1000, 1032, 2000};
    void *p[40];
    int g = 0;
    for (unsigned s = 0; s < sizeof sizes / sizeof *sizes; s++) {
        for (int i = 0; i < 40; i++) {
            p[i] = (i % 5 == 0) ? calloc(1, sizes[s] + id) : malloc(sizes[s] + id % 3);
            memset(p[i], 0x5a, 8);
        }
        /* Free 30 of 40: 7 fill the tcache bin, the rest go to fastbins or bins. */
        for (int i = 0; i < 40; i++) {
            if (i % 4 == 1 && g < GIVE)
                given[id][g++] = p[i]; /* freed by the neighbour thread */
            else if (i % 4 != 0)
                free(p[i]);
            else
                keep(p[i]);
        }
    }
    /* realloc: grow (in place or moved), shrink in place. */
    char *r = malloc(16);
    for (size_t n = 32; n < 70000; n *= 3)
        r = realloc(r, n);
    keep(r);
    keep(realloc(malloc(3000), 100));
    keep(realloc(NULL, 77));
    /* Aligned blocks, small and big. */
    keep(memalign(64, 100 + id));
    void *pm;
    if (posix_memalign(&pm, 256, 3000) == 0)
        keep(pm);
    keep(aligned_alloc(4096, 5000));
    keep(valloc(123));
    keep(memalign(65536, 400000 + 4096 * id));
    /* Big blocks, mmapped while the threshold is low. */
    keep(malloc(300000 + 4096 * id));
    keep(calloc(1, 200000));
    void *big = malloc(500000);
    keep(realloc(big, 900000)); /* mremap */
    free(malloc(1 << 20)); /* raises the mmap threshold: later big blocks from the heap */
    keep(malloc(400000));
}

static void park(void) {
    pthread_mutex_lock(&lock);
    parked++;
    pthread_cond_broadcast(&cond);
    while (1)
        pthread_cond_wait(&cond, &lock);
}

static void *quiet(void *arg) {
    (void)arg;
    keep(malloc(100));
    park();
    return NULL;
}

static void *thread(void *arg) {
    int id = (int)(intptr_t)arg;
    churn(id);
    pthread_barrier_wait(&phase);
    /* Free the neighbour's blocks: they land in this thread's tcache or their arena. */
    int n = (id + 1) % (PARKED + EXITING + 1);
    for (int i = 0; i < GIVE; i++)
        free(given[n][i]);
    pthread_barrier_wait(&phase);
    if (id > PARKED)
        return NULL; /* exits: its tcache is flushed and freed */
    park();
    return NULL;
}

int main(void) {
    pthread_t t[PARKED + EXITING + 1], q[QUIET];
    for (int i = 0; i < QUIET; i++)
        pthread_create(&q[i], NULL, quiet, NULL);
    pthread_barrier_init(&phase, NULL, PARKED + EXITING + 1);
    for (int i = 1; i <= PARKED + EXITING; i++)
        pthread_create(&t[i], NULL, thread, (void *)(intptr_t)i);
    churn(0);
    pthread_barrier_wait(&phase);
    for (int i = 0; i < GIVE; i++)
        free(given[1][i]);
    pthread_barrier_wait(&phase);
    for (int i = PARKED + 1; i <= PARKED + EXITING; i++)
        pthread_join(t[i], NULL);
    pthread_mutex_lock(&lock);
    while (parked < PARKED + QUIET)
        pthread_cond_wait(&cond, &lock);
    pthread_mutex_unlock(&lock);
    printf("ready %d\n", getpid());
    fflush(stdout);
    while (1)
        pause();
}

// Calls unshare(CLONE_NEWUSER) and setns(own mount namespace), which the kernel allows only
// to a single-threaded process (the mount one: a process whose threads do not share its
// filesystem context), and prints each result. Leaks one block before and one after.
// With an argument, it says "ready PID" after setns and waits for a line on stdin.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

void *volatile sink;

int main(int argc, char **argv) {
    (void)argv;
    sink = malloc(111); /* @before */
    sink = 0;
    int fd = open("/proc/self/ns/mnt", O_RDONLY | O_CLOEXEC);
    int r = setns(fd, CLONE_NEWNS);
    printf("setns: %s\n", r == 0 ? "ok" : strerror(errno));
    if (argc > 1) {
        printf("ready %d\n", (int)getpid());
        fflush(stdout);
        char line[16];
        if (!fgets(line, sizeof line, stdin)) return 3;
    }
    r = unshare(CLONE_NEWUSER);
    printf("unshare: %s\n", r == 0 ? "ok" : strerror(errno));
    printf("uid now %d\n", (int)getuid());
    fflush(stdout);
    sink = malloc(222); /* @after */
    sink = 0;
    return 0;
}

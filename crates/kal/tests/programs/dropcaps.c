// Drops privileges the way setpriv and some daemons do: keeps its capabilities across
// setresuid (PR_SET_KEEPCAPS, a per-thread flag), makes them effective again with capset
// (per thread), then changes its groups and group ids. glibc applies setresuid, setgroups
// and setresgid to every thread and aborts the process if one thread fails where another
// succeeded. Prints each result; leaks one block before and one after.
#define _GNU_SOURCE
#include <errno.h>
#include <grp.h>
#include <linux/capability.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

void *volatile sink;

static const char *res(int r) { return r == 0 ? "ok" : strerror(errno); }

int main(void) {
    sink = malloc(101); /* @before */
    sink = 0;
    printf("keepcaps: %s\n", res(prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0)));
    printf("setresuid: %s\n", res(setresuid(65534, 65534, 65534)));
    struct __user_cap_header_struct h = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct d[2];
    memset(d, 0, sizeof d);
    int r = (int)syscall(SYS_capget, &h, d);
    d[0].effective = d[0].permitted;
    d[1].effective = d[1].permitted;
    if (r == 0) r = (int)syscall(SYS_capset, &h, d);
    printf("capset: %s\n", res(r));
    gid_t g = 65534;
    printf("setgroups: %s\n", res(setgroups(1, &g)));
    printf("setresgid: %s\n", res(setresgid(65534, 65534, 65534)));
    printf("ids %d %d\n", (int)getuid(), (int)getgid());
    fflush(stdout);
    sink = malloc(202); /* @after */
    sink = 0;
    return 0;
}

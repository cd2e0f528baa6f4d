// A daemon's start: closefrom(3), then two TCP listeners on 127.0.0.1:PORT1 and PORT2, the
// first left at the lowest free number (3), the second moved to the lowest free number from
// 512: the numbers where the agent kept its own socket before and after it moved its
// descriptors high (closefrom closed them). Says "ready PID", serves N clients on either
// (reads a line, answers "served LINE"), exits.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int listener(const char *port) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(port))};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 64)) exit(4);
    return s;
}

int main(int argc, char **argv) {
    if (argc < 4) return 2;
    closefrom(3);
    int low = listener(argv[1]);
    int s = listener(argv[2]);
    int high = fcntl(s, F_DUPFD, 512);
    if (low != 3 || high < 0) return 5;
    close(s);
    printf("ready %d\n", (int)getpid());
    fflush(stdout);
    int n = atoi(argv[3]);
    for (int i = 0; i < n;) {
        struct pollfd p[2] = {{.fd = low, .events = POLLIN}, {.fd = high, .events = POLLIN}};
        if (poll(p, 2, -1) < 0) return 6;
        for (int j = 0; j < 2; j++) {
            if (!(p[j].revents & POLLIN)) continue;
            int c = accept(p[j].fd, 0, 0);
            if (c < 0) return 7;
            char buf[128];
            ssize_t k = read(c, buf, sizeof buf - 1);
            if (k <= 0) return 8;
            buf[k] = 0;
            char *reply = malloc(160);
            snprintf(reply, 160, "served %s", buf);
            write(c, reply, strlen(reply));
            free(reply);
            close(c);
            i++;
        }
    }
    printf("served %d\n", n);
    return 0;
}

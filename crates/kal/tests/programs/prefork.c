/* A master that forks workers the way nginx does, and stops them the way nginx does.
 * Usage: prefork N SIGNAL [wait] (N workers, default 2; SIGNAL "term" or "quit", default
 * term; with "wait", once the workers are ready the master prints "ready PID" and
 * "workers PID PID ...", and waits for a line on stdin before stopping them).
 *
 * The master leaks 100 bytes, then forks N workers. Each worker, at once, gives up root as
 * nginx's ngx_worker_process_init does (setgid, setgroups, setuid to 65534: from then on
 * it may not enter kal's 0700 directory), leaks 77 bytes, says it is ready on a pipe and
 * waits for SIGTERM or SIGQUIT (handled, as nginx handles them). On the signal it leaves
 * its loop and calls exit(0) from a function of its own, as ngx_worker_process_exit does.
 * Once every worker is ready, the master sends them the signal, waits for each (as
 * nginx's master: it SIGKILLs a worker that takes more than 1.5 s) and prints one line per
 * worker, in fork order: "worker I exited 0" or what happened. It returns 0. */
#define _GNU_SOURCE
#include <grp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

void *volatile sink;
static volatile sig_atomic_t stop;

static void on_signal(int sig) { stop = sig; }

static void worker_exit(void) {
  exit(0);
}

static void worker(int ready) {
  gid_t g = 65534;
  if (setgid(65534) != 0 || setgroups(1, &g) != 0 || setuid(65534) != 0) {
    perror("dropping root");
    _exit(9);
  }
  sink = malloc(77); /* @worker_leak */
  sink = NULL;
  sigset_t none;
  sigemptyset(&none);
  if (write(ready, "r", 1) != 1)
    _exit(8);
  close(ready);
  while (!stop)
    sigsuspend(&none);
  worker_exit();
}

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
  int n = argc > 1 ? atoi(argv[1]) : 2;
  int sig = argc > 2 && strcmp(argv[2], "quit") == 0 ? SIGQUIT : SIGTERM;
  if (n < 1 || n > 64)
    return 2;
  sink = malloc(100); /* @master_leak */
  sink = NULL;
  /* Blocked until a worker waits for it in sigsuspend (nginx blocks them likewise). */
  sigset_t block;
  sigemptyset(&block);
  sigaddset(&block, SIGTERM);
  sigaddset(&block, SIGQUIT);
  sigprocmask(SIG_BLOCK, &block, NULL);
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_signal;
  sigaction(SIGTERM, &sa, NULL);
  sigaction(SIGQUIT, &sa, NULL);
  int fds[2];
  if (pipe(fds) != 0)
    return 3;
  pid_t pids[64];
  for (int i = 0; i < n; i++) {
    pids[i] = fork();
    if (pids[i] < 0)
      return 4;
    if (pids[i] == 0) {
      close(fds[0]);
      worker(fds[1]);
    }
  }
  close(fds[1]);
  char c;
  for (int i = 0; i < n; i++)
    if (read(fds[0], &c, 1) != 1)
      break;
  if (argc > 3 && strcmp(argv[3], "wait") == 0) {
    printf("ready %d\nworkers", (int)getpid());
    for (int i = 0; i < n; i++)
      printf(" %d", (int)pids[i]);
    printf("\n");
    fflush(stdout);
    char line[16];
    if (!fgets(line, sizeof line, stdin))
      return 5;
  }
  for (int i = 0; i < n; i++)
    kill(pids[i], sig);
  for (int i = 0; i < n; i++) {
    int st = 0;
    double t0 = now();
    int killed = 0;
    while (waitpid(pids[i], &st, WNOHANG) == 0) {
      if (!killed && now() - t0 > 1.5) {
        kill(pids[i], SIGKILL);
        killed = 1;
      }
      usleep(1000);
    }
    if (WIFEXITED(st))
      printf("worker %d exited %d\n", i, WEXITSTATUS(st));
    else
      printf("worker %d killed by signal %d\n", i, WTERMSIG(st));
  }
  return 0;
}

/* Leaks 55 bytes, then ends the way argv[1] says:
 *   return        main returns 4
 *   exit          exit(4)
 *   _exit         _exit(5), with "unflushed" left in stdout's buffer (never written)
 *   abort         abort()
 *   segv          a write through a null pointer (SIGSEGV)
 *   sigterm       kill(getpid(), SIGTERM), SIGTERM's action being the default
 *   raise_abrt    raise(SIGABRT) (not abort(), which the agent sees coming)
 *   wait          prints "ready PID" and waits for signals (a SIGTERM from outside ends it)
 *   pthread_exit  the main thread calls pthread_exit; a worker leaks later and returns
 *   thread_exit   a worker calls exit(3) while the main thread waits in pthread_join
 *   vfork         a vfork child calls _exit(7) (in the parent's memory); main returns 4
 * With "child WAY", a forked child leaks 77 bytes more and ends that way while the parent
 * waits for it, then returns 0. No core files are written. */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>
void *volatile sink;
int *volatile null_ptr;
static void *late_worker(void *a) {
  usleep(200000);
  sink = malloc(66); /* @late_leak */
  sink = NULL;
  return a;
}
static void *exiting_worker(void *a) {
  usleep(100000);
  exit(3);
  return a;
}
static int end(const char *how) {
  pthread_t t;
  if (strcmp(how, "exit") == 0)
    exit(4);
  if (strcmp(how, "_exit") == 0) {
    printf("unflushed");
    _exit(5);
  }
  if (strcmp(how, "abort") == 0)
    abort();
  if (strcmp(how, "segv") == 0)
    *null_ptr = 1;
  if (strcmp(how, "sigterm") == 0)
    kill(getpid(), SIGTERM);
  if (strcmp(how, "raise_abrt") == 0)
    raise(SIGABRT);
  if (strcmp(how, "wait") == 0) {
    printf("ready %d\n", getpid());
    fflush(stdout);
    for (;;)
      pause();
  }
  if (strcmp(how, "pthread_exit") == 0) {
    pthread_create(&t, NULL, late_worker, NULL);
    pthread_exit(NULL);
  }
  if (strcmp(how, "vfork") == 0) {
    pid_t pid = vfork();
    if (pid == 0)
      _exit(7);
    int st;
    waitpid(pid, &st, 0);
  }
  if (strcmp(how, "thread_exit") == 0) {
    pthread_create(&t, NULL, exiting_worker, NULL);
    pthread_join(t, NULL);
  }
  return 4;
}
int main(int argc, char **argv) {
  struct rlimit no_core = {0, 0};
  setrlimit(RLIMIT_CORE, &no_core);
  sink = malloc(55); /* @main_leak */
  sink = NULL;
  const char *how = argc > 1 ? argv[1] : "return";
  if (strcmp(how, "child") == 0 && argc > 2) {
    pid_t pid = fork();
    if (pid == 0) {
      sink = malloc(77); /* @child_leak */
      sink = NULL;
      return end(argv[2]);
    }
    int st;
    waitpid(pid, &st, 0);
    return 0;
  }
  return end(how);
}

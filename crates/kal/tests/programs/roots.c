/* Blocks whose only pointer lives in TLS, a global, an mmap'd region, another thread's
 * stack or a register: none of them may be reported. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
__thread void *in_tls;
void *in_global;
static pthread_barrier_t ready;
static void *stack_holder(void *arg) {
  (void)arg;
  void *volatile on_stack = malloc(303);
  pthread_barrier_wait(&ready);
  for (;;) pause();
  return on_stack;
}
static void *reg_holder(void *arg) {
  (void)arg;
  register void *r12 asm("r12") = malloc(404);
  memset(r12, 0, 404);
  pthread_barrier_wait(&ready);
  asm volatile("1: pause\n jmp 1b" : : "r"(r12));
  return NULL;
}
int main(void) {
  pthread_t a, b;
  pthread_barrier_init(&ready, NULL, 3);
  in_tls = malloc(101);
  in_global = malloc(202);
  void **region = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  region[7] = malloc(505);
  pthread_create(&a, NULL, stack_holder, NULL);
  pthread_create(&b, NULL, reg_holder, NULL);
  pthread_barrier_wait(&ready);
  exit(0);
}

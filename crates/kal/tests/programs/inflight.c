/* Pointers in flight between threads, all the time: held only in a register, passed
 * through a lock-free mailbox, and through a mutex-protected queue. Nothing is ever lost. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static _Atomic(void *) mailbox;
struct node { struct node *next; char data[40]; };
static struct node *head, *tail;
static int queued;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static void *in_register(void *arg) {
  (void)arg;
  for (;;) {
    register char *p asm("r12") = malloc(64);
    for (int i = 0; i < 1000; i++) asm volatile("" : "+r"(p));
    free(p);
  }
}
static void *mail_producer(void *arg) {
  (void)arg;
  for (;;) {
    void *p = malloc(32);
    void *expected = NULL;
    while (!atomic_compare_exchange_weak(&mailbox, &expected, p)) expected = NULL;
  }
}
static void *mail_consumer(void *arg) {
  (void)arg;
  for (;;) {
    void *q = atomic_exchange(&mailbox, NULL);
    if (q) free(q);
  }
}
static void *queue_producer(void *arg) {
  (void)arg;
  for (;;) {
    struct node *n = malloc(sizeof *n);
    n->next = NULL;
    pthread_mutex_lock(&lock);
    if (queued < 1000) {
      if (tail) tail->next = n; else head = n;
      tail = n;
      queued++;
      n = NULL;
    }
    pthread_mutex_unlock(&lock);
    free(n);
  }
}
static void *queue_consumer(void *arg) {
  (void)arg;
  for (;;) {
    pthread_mutex_lock(&lock);
    struct node *n = head;
    if (n) { head = n->next; if (!head) tail = NULL; queued--; }
    pthread_mutex_unlock(&lock);
    free(n);
  }
}
int main(void) {
  void *(*fns[])(void *) = {in_register, mail_producer, mail_consumer, queue_producer, queue_consumer};
  pthread_t t;
  for (int i = 0; i < 5; i++) pthread_create(&t, NULL, fns[i], NULL);
  printf("ready %d\n", getpid());
  fflush(stdout);
  for (;;) pause();
}

/* kal's built-in example: a tiny "request handler" loop with three kinds of leak.
 * Build: gcc -g -O1 -o leaky examples/leaky.c */
#include <stdlib.h>
#include <string.h>
#include <stdio.h>

struct request { char *path; char *body; struct request *next; };
struct request *history;           /* requests we keep on purpose: still reachable */

static struct request *parse(int i) {
  struct request *r = calloc(1, sizeof *r);
  r->path = strdup("/index.html");
  r->body = malloc(4096);           /* the body buffer */
  memset(r->body, 'x', 4096);
  r->next = NULL;
  (void)i;
  return r;
}

static void handle(int i) {
  struct request *r = parse(i);
  if (i % 10 == 0) {                /* every 10th request is kept in the history */
    r->next = history;
    history = r;
    return;
  }
  free(r->body);                    /* bug: r->path is never freed */
  free(r);
}

int main(void) {
  for (int i = 0; i < 100; i++) handle(i);
  char *banner = malloc(64);        /* bug: the banner is never freed */
  snprintf(banner, 64, "served %d requests\n", 100);
  fputs(banner, stdout);
  return 0;
}

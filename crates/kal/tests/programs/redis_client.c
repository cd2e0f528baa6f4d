/* A verifying redis client speaking RESP over a raw socket.
 *
 * redis_client PORT N SECONDS [SEED]
 *
 * Loads keys "k:0" .. "k:N-1" with SET (pipelined), each value derived from its key
 * (8 to 135 bytes of a hash of the key), then for SECONDS runs mixed traffic over keys
 * 0 .. N + N/4 - 1 in pipelined batches: 50 % GET, 35 % SET, 15 % DEL. It keeps a model of
 * which keys exist and checks every reply: SET gets +OK, DEL gets :1 or :0 as the model
 * says, GET gets exactly the key's value, or nil for a key that does not exist.
 *
 * Prints "loaded N" and "mixed ops O sets S gets G hits H dels D mismatches M".
 * Exit status: 0 all replies as expected, 1 a mismatch, 2 a connection or protocol error. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int fd;
static char rbuf[1 << 16];
static size_t rpos, rlen;
static char *wbuf;
static size_t wlen, wcap;

static void die(const char *what) {
  fprintf(stderr, "redis_client: %s\n", what);
  exit(2);
}

static uint64_t mix(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

/* The value of key k: 8..135 hex digits of a hash chain seeded by k. */
static size_t value_of(uint64_t k, char *out) {
  uint64_t h = mix(k + 0x1234567);
  size_t len = 8 + h % 128;
  for (size_t i = 0; i < len; i++) {
    if (i % 16 == 0) h = mix(h + i);
    out[i] = "0123456789abcdef"[(h >> ((i % 16) * 4)) & 15];
  }
  return len;
}

static void put(const char *s, size_t n) {
  if (wlen + n > wcap) {
    wcap = (wlen + n) * 2;
    wbuf = realloc(wbuf, wcap);
    if (!wbuf) die("out of memory");
  }
  memcpy(wbuf + wlen, s, n);
  wlen += n;
}

static void put_bulk(const char *s, size_t n) {
  char hdr[32];
  int h = snprintf(hdr, sizeof hdr, "$%zu\r\n", n);
  put(hdr, h);
  put(s, n);
  put("\r\n", 2);
}

static void command(const char *verb, uint64_t k, int with_value) {
  char key[32], val[160], hdr[16];
  int kn = snprintf(key, sizeof key, "k:%llu", (unsigned long long)k);
  int h = snprintf(hdr, sizeof hdr, "*%d\r\n", with_value ? 3 : 2);
  put(hdr, h);
  put_bulk(verb, strlen(verb));
  put_bulk(key, kn);
  if (with_value) put_bulk(val, value_of(k, val));
}

static void flush_out(void) {
  size_t off = 0;
  while (off < wlen) {
    ssize_t w = write(fd, wbuf + off, wlen - off);
    if (w <= 0) die("write failed (server gone?)");
    off += w;
  }
  wlen = 0;
}

static int getc_r(void) {
  if (rpos == rlen) {
    ssize_t r = read(fd, rbuf, sizeof rbuf);
    if (r <= 0) die("read failed (server gone?)");
    rpos = 0;
    rlen = r;
  }
  return (unsigned char)rbuf[rpos++];
}

/* One reply line without its CRLF. */
static size_t line(char *out, size_t cap) {
  size_t n = 0;
  for (;;) {
    int c = getc_r();
    if (c == '\r') {
      if (getc_r() != '\n') die("protocol: CR without LF");
      out[n] = 0;
      return n;
    }
    if (n + 1 >= cap) die("protocol: line too long");
    out[n++] = (char)c;
  }
}

static long mismatches;

static void mismatch(const char *what, uint64_t k, const char *got) {
  if (mismatches++ < 10) fprintf(stderr, "redis_client: MISMATCH %s k:%llu: got %s\n", what,
                                 (unsigned long long)k, got);
}

enum { OP_SET, OP_GET, OP_DEL };

/* Checks the reply to one command; `present` is the model's state before it. */
static int check(int op, uint64_t k, int present) {
  char l[256], want[160];
  line(l, sizeof l);
  switch (op) {
  case OP_SET:
    if (strcmp(l, "+OK")) mismatch("SET", k, l);
    return 0;
  case OP_DEL: {
    const char *w = present ? ":1" : ":0";
    if (strcmp(l, w)) mismatch("DEL", k, l);
    return 0;
  }
  default: {
    if (l[0] != '$') {
      mismatch("GET", k, l);
      return 0;
    }
    long n = atol(l + 1);
    if (n < 0) {
      if (present) mismatch("GET (key missing)", k, l);
      return 0;
    }
    if (n >= (long)sizeof l - 1) die("protocol: value too long");
    for (long i = 0; i < n; i++) l[i] = (char)getc_r();
    l[n] = 0;
    if (getc_r() != '\r' || getc_r() != '\n') die("protocol: bulk without CRLF");
    size_t wn = value_of(k, want);
    if (!present || (size_t)n != wn || memcmp(l, want, wn)) mismatch("GET (value)", k, l);
    return 1;
  }
  }
}

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
  if (argc < 4) {
    fprintf(stderr, "usage: redis_client PORT N SECONDS [SEED]\n");
    return 2;
  }
  int port = atoi(argv[1]);
  uint64_t n = strtoull(argv[2], NULL, 10);
  double seconds = atof(argv[3]);
  uint64_t rng = argc > 4 ? strtoull(argv[4], NULL, 10) : 42;
  fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, (struct sockaddr *)&sa, sizeof sa)) die("cannot connect");
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);

  enum { BATCH = 256 };
  for (uint64_t k = 0; k < n;) {
    uint64_t end = k + BATCH < n ? k + BATCH : n;
    for (uint64_t j = k; j < end; j++) command("SET", j, 1);
    flush_out();
    for (uint64_t j = k; j < end; j++) check(OP_SET, j, 0);
    k = end;
  }
  printf("loaded %llu\n", (unsigned long long)n);
  fflush(stdout);

  uint64_t space = n + n / 4 + 1;
  unsigned char *present = calloc(space, 1);
  if (!present) die("out of memory");
  memset(present, 1, n);
  long ops = 0, sets = 0, gets = 0, hits = 0, dels = 0;
  double end = now() + seconds;
  static int bop[64];
  static uint64_t bkey[64];
  static unsigned char bpresent[64];
  while (seconds > 0 && now() < end && mismatches == 0) {
    for (int i = 0; i < 64; i++) {
      rng = mix(rng);
      uint64_t k = (rng >> 8) % space;
      int r = rng % 100;
      int op = r < 50 ? OP_GET : r < 85 ? OP_SET : OP_DEL;
      bop[i] = op;
      bkey[i] = k;
      bpresent[i] = present[k];
      if (op == OP_SET) {
        command("SET", k, 1);
        present[k] = 1;
      } else if (op == OP_DEL) {
        command("DEL", k, 0);
        present[k] = 0;
      } else {
        command("GET", k, 0);
      }
    }
    flush_out();
    for (int i = 0; i < 64; i++) {
      hits += check(bop[i], bkey[i], bpresent[i]);
      sets += bop[i] == OP_SET;
      gets += bop[i] == OP_GET;
      dels += bop[i] == OP_DEL;
    }
    ops += 64;
  }
  printf("mixed ops %ld sets %ld gets %ld hits %ld dels %ld mismatches %ld\n", ops, sets, gets,
         hits, dels, mismatches);
  return mismatches ? 1 : 0;
}

// Leaks objects of two virtual classes and C strings, with nothing pointing to them:
// 3 Widget (32 bytes, 40 usable), 5 toys::Gadget (48 bytes, 56 usable) and 4 strings of
// 30 bytes (40 usable) that start "kal leaked string", 2 Callback structs (24 bytes, 24
// usable) pointing at the function on_event and the variable counter; keeps one Widget
// in a global.
// Says "ready PID", then waits for ever with the argument "wait", else returns.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <unistd.h>
struct Widget {
  virtual ~Widget() {}
  virtual int area() { return (int)w * (int)h; }
  long w = 1, h = 2, d = 3;
};
namespace toys {
struct Gadget {
  virtual ~Gadget() {}
  virtual const char *name() { return label; }
  char label[40] = "gadget";
};
}  // namespace toys
extern "C" void on_event(int n) { std::printf("event %d\n", n); }
int counter;
struct Callback {
  void (*fn)(int);
  int *count;
  long flags;
};
Widget *kept;
void *volatile sink;
// Not inlined: no pointer to what it leaked stays in main's registers or frame.
__attribute__((noinline)) static void leak() {
  for (int i = 0; i < 3; i++) sink = new Widget();
  for (int i = 0; i < 5; i++) sink = new toys::Gadget();
  for (int i = 0; i < 4; i++) {
    char *s = (char *)malloc(30);
    snprintf(s, 30, "kal leaked string %d", i);
    sink = s;
  }
  for (int i = 0; i < 2; i++) sink = new Callback{on_event, &counter, 0};
  sink = nullptr;
}
__attribute__((noinline)) static void scrub() {
  volatile char pad[4096];
  memset((char *)pad, 0, sizeof pad);
}
int main(int argc, char **argv) {
  kept = new Widget();
  leak();
  scrub();
  printf("ready %d\n", getpid());
  fflush(stdout);
  if (argc > 1 && strcmp(argv[1], "wait") == 0)
    for (;;) pause();
  return 0;
}

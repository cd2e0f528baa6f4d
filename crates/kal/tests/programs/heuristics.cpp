// Blocks held only through interior pointers of common layouts, which memcheck's default
// heuristics treat as reachable: an old-ABI std::string (pointer 24 bytes into its rep),
// new[] of objects with destructors (8-byte element-count cookie), a pointer to the second
// base of a multiply inherited object, and a length-prefixed block (sqlite-style +8).
#define _GLIBCXX_USE_CXX11_ABI 0
#include <cstdint>
#include <cstdlib>
#include <string>
#include "stop_point.h" /* with KAL_STOP set: "ready PID", then wait */
struct Obj {
  ~Obj() { v = 0; }
  long v;
};
struct A {
  virtual ~A() {}
  long a;
};
struct B {
  virtual ~B() {}
  long b;
};
struct C : A, B {
  ~C() override {}
  long c;
};
std::string str;
Obj *arr;
B *as_b;
char *len64;
void *volatile sink;
int main() {
  str = "a string that is long enough to live on the heap";
  arr = new Obj[4];
  as_b = new C;
  uint64_t *p = static_cast<uint64_t *>(malloc(8 + 40));
  p[0] = 40;
  len64 = reinterpret_cast<char *>(p + 1);
  sink = malloc(77); // @heur_lost
  sink = nullptr;
  stop_point();
  return 0;
}

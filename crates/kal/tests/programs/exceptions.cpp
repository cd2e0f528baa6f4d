// Throws and catches C++ exceptions (the runtime's emergency pool is allocated at start)
// and leaks 44 bytes.
#include <stdexcept>
#include <string>
char *volatile sink;
static void thrower(int i) {
  if (i % 2 == 0)
    throw std::runtime_error("even " + std::to_string(i));
  throw i;
}
int main() {
  int caught = 0;
  for (int i = 0; i < 10; i++) {
    try {
      thrower(i);
    } catch (const std::exception &) {
      caught++;
    } catch (int) {
      caught++;
    }
  }
  sink = new char[44]; // @exc_leak
  sink = nullptr;
  return caught == 10 ? 0 : 1;
}

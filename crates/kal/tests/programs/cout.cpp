// Writes through std::cout (stdout's buffer, libstdc++'s emergency exception pool) and
// leaks 33 bytes: memcheck, after __libc_freeres and __gnu_cxx::__freeres, sees nothing
// else.
#include <iostream>
char *volatile sink;
int main() {
  std::cout << "hello from cout " << 42 << std::endl;
  sink = new char[33]; // @cout_leak
  sink = nullptr;
  return 0;
}

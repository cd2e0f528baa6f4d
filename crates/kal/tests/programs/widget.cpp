// C++: a leaked object made by a factory method, and one held by a global.
#include <string>
#include "stop_point.h" /* with KAL_STOP set: "ready PID", then wait */
namespace shop {
struct Widget {
  virtual ~Widget() {}
  long parts[5];
};
struct Factory {
  static Widget *create() { return new Widget(); } // @create
};
}  // namespace shop
shop::Widget *kept;
int main() {
  kept = shop::Factory::create();
  shop::Widget *volatile lost = shop::Factory::create();
  lost = nullptr;
  stop_point();
  return 0;
}

// C++: a leaked object made by a factory method, and one held by a global.
#include <string>
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
  return 0;
}

#include "patch_gate.h"

namespace medfedpure {
const char* build_info() { return "medfedpure._C (C++17)"; }
}  // namespace medfedpure

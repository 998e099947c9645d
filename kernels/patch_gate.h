// The fused patch gate: one operation, one signature for the CPU and CUDA implementations.
// Semantics: shared/DESIGN.md section 5 and medfedpure.ops.patch_gate_reference (the oracle).
#pragma once
#include <cstdint>

namespace medfedpure {

// Placeholder kept only until the gate lands; see kernels/README in the gate issue.
const char* build_info();

}  // namespace medfedpure

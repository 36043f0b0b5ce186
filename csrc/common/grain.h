// Grain size for at::parallel_for: at least kMinTaskWork scalar operations per task, so small
// problems run on one thread. A parallel region costs microseconds, and far more when another
// process holds a core (OpenMP threads then wait on a barrier for a descheduled peer).
#pragma once
#include <algorithm>
#include <cstdint>

namespace pfc_fast {

constexpr int64_t kMinTaskWork = int64_t{1} << 16;

// Items per task when each item costs `work_per_item` operations.
inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(1, work_per_item));
}

}  // namespace pfc_fast

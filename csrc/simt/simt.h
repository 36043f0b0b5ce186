// SIMT execution of CUDA kernels on the CPU: what csrc/*/*_cuda.cu use of CUDA, for the host
// compiler (g++), so that the same kernel sources that nvcc builds for the GPU run in every CI run.
//
// A launch runs the blocks of the grid one at a time, in a shuffled order drawn from a seeded
// generator (set_block_order_seed), and the blockDim threads of a block as cooperatively scheduled
// fibers (Boost.Context). A thread runs until it reaches a barrier (__syncthreads), a warp
// operation (__syncwarp, __shfl_*_sync) or its end; then the next thread that can go on runs,
// round robin from a thread drawn with the block order (so which thread runs ahead varies).
// The semantics are CUDA's (Programming Guide, "Warp Shuffle Functions", "Synchronization
// Functions", "Atomic Functions"; PTX ISA "shfl.sync"), with independent thread scheduling:
//   - a barrier releases when every live (not yet exited) thread of the block waits at it;
//   - a __syncwarp completes when every lane of its mask that has not exited has reached one
//     (any __syncwarp with that mask, as on sm_70 and later);
//   - a shuffle completes when every lane of its mask has reached it, at the same call (stricter
//     than PTX on sm_70+, which lets corresponding shfl.sync instructions meet);
//   - shuffles move any 4- or 8-byte value; an out-of-range source lane gives the lane's own value,
//     exactly as the PTX pseudocode of shfl.sync (low 5 bits of the lane argument) says.
// Where a GPU hangs or returns undefined values, a pfc_simt::Error (a std::runtime_error, so a
// RuntimeError in Python) names the kernel's file and line instead:
//   - a __syncthreads that the other live threads do not reach (they wait at another barrier or
//     in a warp operation, or the block cannot go on);
//   - a shuffle whose mask names a lane that has exited or that the block does not have (what it
//     reads from such a lane is undefined), or a diverged lane (one at another call), or whose
//     source lane is not in the mask; a warp operation whose mask leaves out the calling lane;
//   - a launch outside CUDA's limits: more than 1024 threads per block (or blockDim.z > 64), a grid
//     with gridDim.y or gridDim.z over 65535, an empty grid or block, or more than the 48 KiB of
//     shared memory (static + dynamic) that a kernel gets without opting in; and a grid of more
//     than 2^24 blocks, which this layer does not emulate.
// Shared memory is one allocation per block, filled with 0xFF bytes (NaN, -1) when the block
// starts, so a read before the first write shows. Each thread has a 512 KiB stack (CUDA's most
// local memory per thread) with a guard page. Accesses out of bounds (of a tensor, of shared
// memory) are not checked in this build; the AddressSanitizer build (tools/simt_asan.sh) reports
// them. What this layer does not reproduce: timing and the hardware warp scheduler (threads
// interleave only at the operations above), memory ordering between threads (every access is seen
// at once), and concurrency between blocks.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- types and built-in variables -------------------------------------------------------------

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = struct CUstream_st*;  // launches run synchronously: no stream

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline

constexpr int warpSize = 32;

// The running thread's coordinates, set by the scheduler whenever it switches threads.
extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;

// ---- math functions and integer min/max as device code sees them ------------------------------

using std::exp;
using std::fmax;
using std::fmin;
using std::log;
using std::sqrt;

#define PFC_SIMT_MIN_MAX(T)                                    \
  inline T min(T a, T b) { return b < a ? b : a; }            \
  inline T max(T a, T b) { return a < b ? b : a; }
PFC_SIMT_MIN_MAX(int)
PFC_SIMT_MIN_MAX(unsigned)
PFC_SIMT_MIN_MAX(long)
PFC_SIMT_MIN_MAX(unsigned long)
PFC_SIMT_MIN_MAX(long long)
PFC_SIMT_MIN_MAX(unsigned long long)
#undef PFC_SIMT_MIN_MAX

namespace pfc_simt {

// What the layer reports for the emulated device: an H200's multiprocessors, CUDA's limits.
constexpr int kMultiprocessors = 132;
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxBlockDimZ = 64;
constexpr unsigned kMaxGridDimYZ = 65535;
constexpr std::size_t kSharedBytesWithoutOptIn = 48 * 1024;

// A misuse of CUDA that a GPU would hang on or answer with undefined values.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Where in a kernel an operation is (its file and line: two calls on one line count as one) and what it is.
struct Site {
  const char* file;
  int line;
  const char* what;
};
#define PFC_SIMT_SITE(what) (::pfc_simt::Site{__FILE__, __LINE__, what})

// ---- synchronisation and warp operations ------------------------------------------------------

void syncthreads(Site site);

enum class WarpOp { sync, idx, up, down, bfly };
// Lane `value`s meet at the warp operation; returns the value this lane receives (for sync: its own).
std::uint64_t warp_exchange(Site site, WarpOp op, unsigned mask, std::uint64_t value, unsigned arg, int width);

template <typename T>
T shuffle(Site site, WarpOp op, unsigned mask, T var, unsigned arg, int width = warpSize) {
  static_assert(std::is_trivially_copyable_v<T> && (sizeof(T) == 4 || sizeof(T) == 8),
                "warp shuffles move 4- or 8-byte values");
  std::uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = warp_exchange(site, op, mask, bits, arg, width);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

// The warp operations as callables, so that __syncwarp() and __syncwarp(mask), and shuffles with or
// without a width, are one macro each: __shfl_sync(mask, v, lane) is ShuffleCall<idx>(site)(mask, v, lane).
class SyncWarpCall {
 public:
  explicit SyncWarpCall(Site site) : site_(site) {}
  void operator()(unsigned mask = 0xffffffffu) const { warp_exchange(site_, WarpOp::sync, mask, 0, 0, 32); }

 private:
  Site site_;
};

template <WarpOp Op>
class ShuffleCall {
 public:
  explicit ShuffleCall(Site site) : site_(site) {}
  template <typename T>
  T operator()(unsigned mask, T var, unsigned lane_or_delta, int width = warpSize) const {
    return shuffle(site_, Op, mask, var, lane_or_delta, width);
  }

 private:
  Site site_;
};

// ---- atomics: read-modify-write of the value at address, returning the old value -----------------

template <typename T>
T atomic_add(T* address, T value) {
  if constexpr (std::is_integral_v<T>) {
    return __atomic_fetch_add(address, value, __ATOMIC_RELAXED);
  } else {
    using Bits = std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint64_t>;
    Bits* bits = reinterpret_cast<Bits*>(address);
    Bits expected = __atomic_load_n(bits, __ATOMIC_RELAXED);
    for (;;) {
      T old;
      std::memcpy(&old, &expected, sizeof(T));
      const T sum = old + value;
      Bits desired;
      std::memcpy(&desired, &sum, sizeof(T));
      if (__atomic_compare_exchange_n(bits, &expected, desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) return old;
    }
  }
}

// ---- shared memory ----------------------------------------------------------------------------

// The block's copy of the __shared__ variable whose declaration owns `key` (allocated by its first
// user; `site` names it in errors).
void* static_shared(const void* key, Site site, std::size_t bytes, std::size_t align);
// The block's dynamic shared memory (the launch's shared-memory bytes, 16-byte aligned).
void* dynamic_shared();

// ---- launches ---------------------------------------------------------------------------------

struct LaunchConfig {
  dim3 grid, block;
  std::size_t shared_bytes;
  Site site;  // the launching line
};
// Runs `thread` (the kernel body with its arguments) for every thread of every block.
void run_grid(const LaunchConfig& config, const std::function<void()>& thread);

// kernel<<<grid, block, shared_bytes>>>(args...) written launch(kernel, grid, block, shared_bytes,
// stream)(args...); the arguments are converted to the kernel's parameter types once, like CUDA's
// parameter buffer, and each thread gets its own copy.
template <typename... Params>
class Launch {
 public:
  Launch(void (*kernel)(Params...), LaunchConfig config) : kernel_(kernel), config_(config) {}
  template <typename... Args>
  void operator()(Args&&... args) const {
    const std::tuple<Params...> params(std::forward<Args>(args)...);
    run_grid(config_, [&] { std::apply(kernel_, params); });
  }

 private:
  void (*kernel_)(Params...);
  LaunchConfig config_;
};

template <typename... Params>
Launch<Params...> launch(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t shared_bytes, cudaStream_t,
                         const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return Launch<Params...>(kernel, LaunchConfig{grid, block, shared_bytes, Site{file, line, "kernel launch"}});
}

// ---- control and statistics (pfc_fast._simt) ----------------------------------------------------

void set_block_order_seed(std::uint64_t seed);
struct Stats {
  std::uint64_t launches, blocks, threads, switches;
};
Stats stats();

}  // namespace pfc_simt

#define __syncthreads() ::pfc_simt::syncthreads(PFC_SIMT_SITE("__syncthreads"))
#define __syncwarp ::pfc_simt::SyncWarpCall(PFC_SIMT_SITE("__syncwarp"))
#define __shfl_sync ::pfc_simt::ShuffleCall<::pfc_simt::WarpOp::idx>(PFC_SIMT_SITE("__shfl_sync"))
#define __shfl_up_sync ::pfc_simt::ShuffleCall<::pfc_simt::WarpOp::up>(PFC_SIMT_SITE("__shfl_up_sync"))
#define __shfl_down_sync ::pfc_simt::ShuffleCall<::pfc_simt::WarpOp::down>(PFC_SIMT_SITE("__shfl_down_sync"))
#define __shfl_xor_sync ::pfc_simt::ShuffleCall<::pfc_simt::WarpOp::bfly>(PFC_SIMT_SITE("__shfl_xor_sync"))

inline int atomicAdd(int* address, int value) { return pfc_simt::atomic_add(address, value); }
inline unsigned atomicAdd(unsigned* address, unsigned value) { return pfc_simt::atomic_add(address, value); }
inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long value) {
  return pfc_simt::atomic_add(address, value);
}
inline float atomicAdd(float* address, float value) { return pfc_simt::atomic_add(address, value); }
inline double atomicAdd(double* address, double value) { return pfc_simt::atomic_add(address, value); }

// __shared__ T name[dims] and extern __shared__ T name[] (see csrc/common/device.h). The static
// char's address tells this declaration (in this template instance) from every other one.
#define PFC_SHARED(type, name, dims)                                                                  \
  static const char pfc_simt_shared_##name = 0;                                                       \
  type(&name) dims = *static_cast<type(*) dims>(::pfc_simt::static_shared(                            \
      &pfc_simt_shared_##name, PFC_SIMT_SITE("__shared__ " #name), sizeof(type dims), alignof(type dims)))
#define PFC_DYNAMIC_SHARED(type, name) type* name = static_cast<type*>(::pfc_simt::dynamic_shared())

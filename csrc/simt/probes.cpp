// Small CUDA kernels with known answers that test the SIMT layer itself (tests/test_simt.py), as
// the operators pfc_simt_probe::*. Written against csrc/common/device.h like the real kernels, so
// each uses a primitive the way CUDA code does; the tests compute the expected answers from
// CUDA's documented semantics.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <string>
#include <type_traits>

#include "common/device.h"

namespace pfc_fast {
namespace {

enum Op : int { kSync, kIdx, kUp, kDown, kXor };

int op_code(const std::string& op) {
  if (op == "sync") return kSync;
  if (op == "idx") return kIdx;
  if (op == "up") return kUp;
  if (op == "down") return kDown;
  if (op == "xor") return kXor;
  TORCH_CHECK(false, "op must be sync, idx, up, down or xor, got ", op);
}

template <typename T>
__device__ T warp_op(int op, unsigned mask, T v, int arg, int width) {
  switch (op) {
    case kIdx: return __shfl_sync(mask, v, arg, width);
    case kUp: return __shfl_up_sync(mask, v, static_cast<unsigned>(arg), width);
    case kDown: return __shfl_down_sync(mask, v, static_cast<unsigned>(arg), width);
    case kXor: return __shfl_xor_sync(mask, v, arg, width);
    default: __syncwarp(mask); return v;
  }
}

// The same operation at another call site: lanes that take it have diverged from the others.
template <typename T>
__device__ T warp_op_elsewhere(int op, unsigned mask, T v, int arg, int width) {
  return op == kSync ? (__syncwarp(mask), v) : __shfl_sync(mask, v, arg, width);
}

// out[t] = the value thread t receives from the warp operation; lanes outside `mask` skip it and
// keep their value; lanes in `exit_mask` return first; lanes in `diverge_mask` use another call.
template <typename T>
__global__ void shuffle_kernel(const T* values, const int64_t* args, T* out, int op, unsigned mask, int width,
                               unsigned exit_mask, unsigned diverge_mask) {
  const int t = threadIdx.x, lane = t % 32;
  if (exit_mask >> lane & 1u) return;
  const T v = values[t];
  if (!(mask >> lane & 1u)) {
    out[t] = v;
    return;
  }
  const int arg = static_cast<int>(args[t]);
  out[t] = (diverge_mask >> lane & 1u) ? warp_op_elsewhere(op, mask, v, arg, width) : warp_op(op, mask, v, arg, width);
}

at::Tensor shuffle(const at::Tensor& values, const std::string& op, const at::Tensor& args, int64_t width, int64_t mask,
                   int64_t exit_mask, int64_t diverge_mask) {
  TORCH_CHECK(values.dim() == 1 && args.sizes() == values.sizes() && args.scalar_type() == at::kLong,
              "values (T,) and args (T,) int64");
  const at::Tensor v = values.contiguous(), a = args.contiguous();
  at::Tensor out = v.clone();
  const int code = op_code(op);
  const auto run = [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    device::launch(shuffle_kernel<T>, 1, static_cast<unsigned>(v.size(0)), 0, nullptr)(
        v.data_ptr<T>(), a.data_ptr<int64_t>(), out.data_ptr<T>(), code, static_cast<unsigned>(mask),
        static_cast<int>(width), static_cast<unsigned>(exit_mask), static_cast<unsigned>(diverge_mask));
  };
  switch (v.scalar_type()) {
    case at::kInt: run(static_cast<int*>(nullptr)); break;
    case at::kLong: run(static_cast<int64_t*>(nullptr)); break;
    case at::kFloat: run(static_cast<float*>(nullptr)); break;
    case at::kDouble: run(static_cast<double*>(nullptr)); break;
    default: TORCH_CHECK(false, "values must be int32, int64, float32 or float64");
  }
  return out;
}

enum Fault : int { kNoFault, kDivergentBarrier, kBarrierInWarpOp, kReadFirst };

int fault_code(const std::string& fault) {
  if (fault == "none") return kNoFault;
  if (fault == "divergent") return kDivergentBarrier;
  if (fault == "barrier_in_warp_op") return kBarrierInWarpOp;
  if (fault == "read_first") return kReadFirst;
  TORCH_CHECK(false, "fault must be none, divergent, barrier_in_warp_op or read_first, got ", fault);
}

// values (blocks, T): each round, every thread publishes v in shared memory and, after a barrier,
// takes v = 0.5 * (its right neighbour's v) + t (block-wide ring). read_first: out = what shared
// memory holds before any write.
__global__ void ring_kernel(const double* values, double* out, int rounds, bool dynamic, int fault) {
  PFC_SHARED(double, fixed, [1024]);
  PFC_DYNAMIC_SHARED(double, extra);
  double* ring = dynamic ? extra : fixed;
  const int t = threadIdx.x, n = blockDim.x;
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * n + t;
  if (fault == kReadFirst) {
    out[slot] = ring[t];
    return;
  }
  double v = values[slot];
  for (int r = 0; r < rounds; ++r) {
    ring[t] = v;
    if (fault == kDivergentBarrier && t >= n / 2) {
      __syncthreads();  // another barrier than the one below
    } else if (fault == kBarrierInWarpOp && t % 32 != 0) {
      v = __shfl_sync(0xffffffffu, v, 0);  // lane 0 is at the barrier below instead
    } else {
      __syncthreads();
    }
    v = 0.5 * ring[(t + 1) % n] + t;
    __syncthreads();
  }
  out[slot] = v;
}

at::Tensor ring(const at::Tensor& values, int64_t rounds, bool dynamic, const std::string& fault) {
  TORCH_CHECK(values.dim() == 2 && values.scalar_type() == at::kDouble, "values (blocks, T) float64");
  const at::Tensor v = values.contiguous();
  at::Tensor out = at::empty_like(v);
  const size_t shared = dynamic ? static_cast<size_t>(v.size(1)) * sizeof(double) : 0;
  device::launch(ring_kernel, static_cast<unsigned>(v.size(0)), static_cast<unsigned>(v.size(1)), shared, nullptr)(
      v.data_ptr<double>(), out.data_ptr<double>(), static_cast<int>(rounds), dynamic, fault_code(fault));
  return out;
}

// Each thread writes blockIdx, threadIdx, the block's size, the grid's size and the block's place
// in the order the blocks ran (a ticket drawn by its first thread) to row (block, thread).
// Touches the first and the last byte of the dynamic shared memory.
__global__ void indices_kernel(int64_t* out, unsigned* tickets, int64_t shared_bytes) {
  PFC_SHARED(unsigned, ticket, [1]);
  PFC_DYNAMIC_SHARED(unsigned char, bytes);
  const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned threads = blockDim.x * blockDim.y * blockDim.z;
  const int64_t block = blockIdx.x + static_cast<int64_t>(gridDim.x) * (blockIdx.y + static_cast<int64_t>(gridDim.y) * blockIdx.z);
  if (t == 0) {
    ticket[0] = atomicAdd(tickets, 1u);
    if (shared_bytes > 0) bytes[0] = bytes[shared_bytes - 1] = 1;
  }
  __syncthreads();
  int64_t* row = out + (block * threads + t) * 9;
  row[0] = blockIdx.x;
  row[1] = blockIdx.y;
  row[2] = blockIdx.z;
  row[3] = threadIdx.x;
  row[4] = threadIdx.y;
  row[5] = threadIdx.z;
  row[6] = threads;
  row[7] = static_cast<int64_t>(gridDim.x) * gridDim.y * gridDim.z;
  row[8] = ticket[0];
}

at::Tensor indices(at::IntArrayRef grid, at::IntArrayRef block, int64_t shared_bytes) {
  TORCH_CHECK(grid.size() == 3 && block.size() == 3, "grid and block are [x, y, z]");
  const int64_t rows = grid[0] * grid[1] * grid[2] * block[0] * block[1] * block[2];
  at::Tensor out = at::full({std::max<int64_t>(rows, 0), 9}, -1, at::kLong);
  at::Tensor tickets = at::zeros({1}, at::kInt);
  const auto u = [](int64_t v) { return static_cast<unsigned>(v); };
  device::launch(indices_kernel, dim3(u(grid[0]), u(grid[1]), u(grid[2])), dim3(u(block[0]), u(block[1]), u(block[2])),
                 static_cast<size_t>(shared_bytes), nullptr)(out.data_ptr<int64_t>(),
                                                             reinterpret_cast<unsigned*>(tickets.data_ptr<int>()),
                                                             shared_bytes);
  return out;
}

// Every thread adds to global counters of each atomicAdd type and to a per-block shared one:
// old (the int counter's value before each thread's add, one per thread) and the totals
// [float += 0.25, double += 0.5 * i, unsigned += 3, unsigned long long += 2^40, shared += 1].
__global__ void atomics_kernel(int* counter, int64_t* old, float* f, double* d, unsigned* u, unsigned long long* ull,
                               double* from_shared) {
  PFC_SHARED(double, block_sum, [1]);
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (threadIdx.x == 0) block_sum[0] = 0.0;
  __syncthreads();
  old[i] = atomicAdd(counter, 1);
  atomicAdd(f, 0.25f);
  atomicAdd(d, 0.5 * static_cast<double>(i));
  atomicAdd(u, 3u);
  atomicAdd(ull, 1ull << 40);
  atomicAdd(block_sum, 1.0);
  __syncthreads();
  if (threadIdx.x == 0) atomicAdd(from_shared, block_sum[0]);
}

std::tuple<at::Tensor, at::Tensor> atomics(int64_t blocks, int64_t threads) {
  at::Tensor counter = at::zeros({1}, at::kInt), old = at::empty({blocks * threads}, at::kLong);
  at::Tensor f = at::zeros({1}, at::kFloat), d = at::zeros({2}, at::kDouble);
  at::Tensor u = at::zeros({1}, at::kInt), ull = at::zeros({1}, at::kLong);
  device::launch(atomics_kernel, static_cast<unsigned>(blocks), static_cast<unsigned>(threads), 0, nullptr)(
      counter.data_ptr<int>(), old.data_ptr<int64_t>(), f.data_ptr<float>(), d.data_ptr<double>(),
      reinterpret_cast<unsigned*>(u.data_ptr<int>()), reinterpret_cast<unsigned long long*>(ull.data_ptr<int64_t>()),
      d.data_ptr<double>() + 1);
  at::Tensor totals = at::stack({f.to(at::kDouble)[0], d[0], u.to(at::kDouble)[0], ull.to(at::kDouble)[0], d[1]});
  return {old, totals};
}

template <typename T>
__device__ T* shared_buffer() {
  PFC_SHARED(T, buffer, [8]);
  return buffer;
}

// Distinct __shared__ variables stay distinct: two declared on one line, and one declaration in
// two template instances of the same size. One warp; out = [10 a + b, int buffer, float buffer].
__global__ void shared_variables_kernel(int64_t* out) {
  PFC_SHARED(int, a, [4]); PFC_SHARED(int, b, [4]);
  if (threadIdx.x == 0) {
    a[0] = 1;
    b[0] = 2;
    shared_buffer<int>()[0] = 3;
    shared_buffer<float>()[0] = 4.0f;
  }
  __syncwarp();
  if (threadIdx.x == 31) {
    out[0] = 10 * a[0] + b[0];
    out[1] = shared_buffer<int>()[0];
    out[2] = static_cast<int64_t>(shared_buffer<float>()[0]);
  }
}

at::Tensor shared_variables() {
  at::Tensor out = at::zeros({3}, at::kLong);
  device::launch(shared_variables_kernel, 1, 32, 0, nullptr)(out.data_ptr<int64_t>());
  return out;
}

}  // namespace

TORCH_LIBRARY(pfc_simt_probe, m) {
  m.def("shuffle(Tensor values, str op, Tensor args, int width, int mask, int exit_mask, int diverge_mask) -> Tensor");
  m.def("ring(Tensor values, int rounds, bool dynamic, str fault) -> Tensor");
  m.def("indices(int[] grid, int[] block, int shared_bytes) -> Tensor");
  m.def("atomics(int blocks, int threads) -> (Tensor old, Tensor totals)");
  m.def("shared_variables() -> Tensor");
}

// CompositeExplicitAutograd: indices and atomics take no tensor to dispatch on.
TORCH_LIBRARY_IMPL(pfc_simt_probe, CompositeExplicitAutograd, m) {
  m.impl("shuffle", &shuffle);
  m.impl("ring", &ring);
  m.impl("indices", &indices);
  m.impl("atomics", &atomics);
  m.impl("shared_variables", &shared_variables);
}

}  // namespace pfc_fast

// What the CUDA kernels (csrc/*/*_cuda.cu) need of the device, in one place, so that the same
// sources build with nvcc for the GPU and, with PFC_SIMT defined, with the host compiler against
// the SIMT layer (csrc/simt/simt.h) for CPU tensors:
//   device::launch(kernel, grid, block, shared_bytes, stream)(args...)
//                                   kernel<<<grid, block, shared_bytes, stream>>>(args...) and its
//                                   launch check (the SIMT layer runs it then and there)
//   device::Guard guard(device)     c10::cuda::CUDAGuard (nothing to switch in the SIMT build)
//   device::current_stream()        the current CUDA stream
//   device::multiprocessor_count(t) the SMs of t's GPU (the SIMT build reports an H200's 132)
//   PFC_SHARED(T, name, [n][m])     __shared__ T name[n][m]
//   PFC_DYNAMIC_SHARED(T, name)     extern __shared__ T name[]
//   PFC_DEVICE_LIBRARY_IMPL(m)      TORCH_LIBRARY_IMPL(pfc_fast, CUDA, m); in the SIMT build
//                                   TORCH_LIBRARY_IMPL(pfc_fast_simt, CPU, m): the same schemas
//                                   (csrc/schemas.h), the CUDA kernels, CPU tensors.
//   PFC_HOST_DEVICE                 __host__ __device__ under nvcc, nothing elsewhere: the functions
//                                   the CPU kernels share with the CUDA ones (csrc/*/*_common.h).
//                                   It is all a CPU source (no nvcc, no PFC_SIMT) gets here.
#pragma once
#include <ATen/ATen.h>
#include <torch/library.h>

#ifdef __CUDACC__
#define PFC_HOST_DEVICE __host__ __device__
#else
#define PFC_HOST_DEVICE
#endif

#ifdef PFC_SIMT

#include "simt/simt.h"

namespace pfc_fast::device {
struct Guard {
  explicit Guard(const at::Device&) {}
};
inline cudaStream_t current_stream() { return nullptr; }
inline int multiprocessor_count(const at::Tensor&) { return pfc_simt::kMultiprocessors; }
using pfc_simt::launch;
}  // namespace pfc_fast::device

#define PFC_DEVICE_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(pfc_fast_simt, CPU, m)

#elif defined(__CUDACC__)  // nvcc

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <utility>

namespace pfc_fast::device {
using Guard = c10::cuda::CUDAGuard;
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }
inline int multiprocessor_count(const at::Tensor& t) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, t.get_device()));
  return count;
}

template <typename... Params>
class Launch {
 public:
  Launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream)
      : kernel_(kernel), grid_(grid), block_(block), shared_bytes_(shared_bytes), stream_(stream) {}
  template <typename... Args>
  void operator()(Args&&... args) const {
    kernel_<<<grid_, block_, shared_bytes_, stream_>>>(std::forward<Args>(args)...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

 private:
  void (*kernel_)(Params...);
  dim3 grid_, block_;
  size_t shared_bytes_;
  cudaStream_t stream_;
};

template <typename... Params>
Launch<Params...> launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream) {
  return Launch<Params...>(kernel, grid, block, shared_bytes, stream);
}
}  // namespace pfc_fast::device

#define PFC_SHARED(type, name, dims) __shared__ type name dims
#define PFC_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#define PFC_DEVICE_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(pfc_fast, CUDA, m)

#endif

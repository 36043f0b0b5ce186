// CUDA kernels of the two passes of the exact NC metrics (docs/spec.md section 3); the CPU twins and the
// formulas are in nc_cpu.cpp, the host side and the decision rules in nc_common.h.
//
// Pass 1 (class_sums_kernel): a block owns blockDim.x feature columns and a chunk of rows; each
// thread owns one column, so it accumulates into its own slot of a shared-memory (L K) x blockDim
// table without atomics (L labellings: each value read once, added to the L sums of its class),
// then adds the table to the float64 sums with one atomic per entry.
//
// Pass 2: project_residuals_kernel reads every feature once per tile of 8 projection rows: a warp
// handles 4 samples, its lanes stride over the columns, forming r = h - mu_y in float64 and
// accumulating s = proj r (4 x 8 register tile) and ||r||^2, reduced over the warp. The
// projections of a chunk of rows go to a scratch buffer (rows x P and rows, far smaller than the
// features when P << D); a cuBLAS product turns their basis coordinates into class scores,
// sample_decisions_kernel takes the nearest-class-centre and classifier decisions, and tensor ops
// add the per-class traces and the basis sums (nc_common.h, add_chunk). With many projection rows
// the host side projects by cuBLAS products instead and only sample_decisions_kernel runs here.
//
// The same source builds for the SIMT layer (device.h); run there, the tensor ops and products are
// the CPU's.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>

#include "nc/nc_common.h"
#include "common/device.h"

namespace pfc_fast {
namespace {

constexpr int kSumThreads = 128;                // columns per pass-1 block
constexpr int kSharedBytes = 48 * 1024;         // pass-1 shared table limit
constexpr int kWarpSamples = 4;                 // samples per warp in pass 2
constexpr int kWarpRows = 8;                    // projection rows per register tile
constexpr int kWarps = 8;                       // warps per pass-2 block
constexpr int64_t kScratchBytes = 256ll << 20;  // bound on the pass-2 scratch buffer

// The float64 atomicAdds into sums arrive in a different order on every GPU run, so the last bits of
// the sums vary; the SIMT layer shuffles the blocks but runs a block's threads one at a time, so it
// reproduces only part of that variation (the tests compare at 1e-12, not bitwise).
template <typename scalar_t>
__global__ void class_sums_kernel(const scalar_t* __restrict__ x, int64_t row_stride,
                                  const int64_t* __restrict__ labels, int64_t N, int64_t D, int64_t K,
                                  int64_t L, int64_t rows_per_chunk, bool shared_table,
                                  double* __restrict__ sums) {
  PFC_DYNAMIC_SHARED(double, table);  // (L K) x blockDim.x when shared_table
  const int tid = threadIdx.x;
  const int64_t d = static_cast<int64_t>(blockIdx.x) * blockDim.x + tid;
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t i1 = min(N, i0 + rows_per_chunk);
  if (d >= D) return;  // no block-wide synchronisation below: each thread owns its column
  if (shared_table) {
    for (int64_t k = 0; k < L * K; ++k) table[k * blockDim.x + tid] = 0.0;
  }
  for (int64_t i = i0; i < i1; ++i) {
    const double v = as_double(x[i * row_stride + d]);
    for (int64_t l = 0; l < L; ++l) {
      const int64_t y = labels[l * N + i];
      if (y < 0 || y >= K) continue;  // rejected on the host; never index out of bounds
      if (shared_table) {
        table[(l * K + y) * blockDim.x + tid] += v;
      } else {
        atomicAdd(sums + (l * K + y) * D + d, v);
      }
    }
  }
  if (shared_table) {
    for (int64_t k = 0; k < L * K; ++k) {
      const double v = table[k * blockDim.x + tid];
      if (v != 0.0) atomicAdd(sums + k * D + d, v);
    }
  }
}

// Projections of a chunk of samples: out[i, p] = proj[p] . r_i (p < P), r_sq[i] = ||r_i||^2.
template <typename scalar_t>
__global__ void project_residuals_kernel(const scalar_t* __restrict__ x, int64_t row_stride,
                                         const int64_t* __restrict__ labels, int64_t rows, int64_t D,
                                         int64_t K, const double* __restrict__ means,
                                         const double* __restrict__ proj, int64_t P, double* __restrict__ out,
                                         double* __restrict__ r_sq) {
  const int lane = threadIdx.x % 32;
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32) * kWarpSamples;
  if (first >= rows) return;
  const scalar_t* xs[kWarpSamples];
  const double* mus[kWarpSamples];
  bool valid[kWarpSamples];
  for (int s = 0; s < kWarpSamples; ++s) {
    const int64_t i = first + s;
    const int64_t y = i < rows ? labels[i] : -1;
    valid[s] = y >= 0 && y < K;
    xs[s] = x + (valid[s] ? i : 0) * row_stride;
    mus[s] = means + (valid[s] ? y : 0) * D;
  }
  double sq[kWarpSamples] = {0.0};
  for (int64_t p0 = 0; p0 < P; p0 += kWarpRows) {
    double acc[kWarpSamples][kWarpRows] = {{0.0}};
    for (int64_t d = lane; d < D; d += 32) {
      double r[kWarpSamples];
      for (int s = 0; s < kWarpSamples; ++s) {
        r[s] = valid[s] ? as_double(xs[s][d]) - mus[s][d] : 0.0;
        if (p0 == 0) sq[s] += r[s] * r[s];
      }
#pragma unroll
      for (int q = 0; q < kWarpRows; ++q) {
        const double w = p0 + q < P ? proj[(p0 + q) * D + d] : 0.0;
#pragma unroll
        for (int s = 0; s < kWarpSamples; ++s) acc[s][q] += w * r[s];
      }
    }
#pragma unroll
    for (int s = 0; s < kWarpSamples; ++s) {
#pragma unroll
      for (int q = 0; q < kWarpRows; ++q) {
        double v = acc[s][q];
        for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
        if (lane == 0 && valid[s] && p0 + q < P) out[(first + s) * P + p0 + q] = v;
      }
    }
  }
#pragma unroll
  for (int s = 0; s < kWarpSamples; ++s) {
    double v = sq[s];
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
    if (lane == 0 && valid[s]) r_sq[first + s] = v;
  }
}

// Per-sample decisions (nc_common.h) of samples start .. start + rows - 1 from their class scores
// (rows, K), their projections products (rows, P) (the logits' from column num_basis) and r_sq (rows,).
template <typename scalar_t>
__global__ void sample_decisions_kernel(const double* __restrict__ scores, const double* __restrict__ products,
                                        const double* __restrict__ r_sq, const scalar_t* __restrict__ x,
                                        int64_t row_stride, const ResidualInputs in, int64_t start, int64_t rows,
                                        int64_t P, unsigned long long* __restrict__ decisions) {
  PFC_SHARED(unsigned long long, block_counts, [2]);
  if (threadIdx.x < 2) block_counts[threadIdx.x] = 0;
  __syncthreads();
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r < rows) {
    const int64_t i = start + r, y = in.labels[i];
    if (y >= 0 && y < in.K) {
      const SampleDecisions decision =
          decide(scores + r * in.K, products + r * P + in.num_basis, r_sq[r], x + i * row_stride, i, y, in);
      if (decision.correct) atomicAdd(&block_counts[0], 1ull);
      if (decision.disagrees) atomicAdd(&block_counts[1], 1ull);
    }
  }
  __syncthreads();
  if (threadIdx.x < 2 && block_counts[threadIdx.x] != 0) atomicAdd(decisions + threadIdx.x, block_counts[threadIdx.x]);
}

// The backend of class_sums_op and residual_stats_op (nc_common.h).
struct CudaBackend {
  static device::Guard guard(const at::Tensor& t) { return device::Guard(t.device()); }

  template <typename scalar_t>
  static void class_sums(const at::Tensor& feats, const ClassSumsArgs& args) {
    const int64_t N = args.N, D = args.D, K = args.K, L = args.L;
    const bool shared_table = L * K * kSumThreads * static_cast<int64_t>(sizeof(double)) <= kSharedBytes;
    const int64_t col_blocks = (D + kSumThreads - 1) / kSumThreads;
    const int64_t wanted = std::max<int64_t>(1, 8 * device::multiprocessor_count(feats) / col_blocks);
    const int64_t chunks = std::min<int64_t>({wanted, (N + 31) / 32, 65535});
    const int64_t rows_per_chunk = (N + chunks - 1) / chunks;
    const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>((N + rows_per_chunk - 1) / rows_per_chunk));
    const size_t shared = shared_table ? L * K * kSumThreads * sizeof(double) : 0;
    device::launch(class_sums_kernel<scalar_t>, grid, kSumThreads, shared, device::current_stream())(
        feats.data_ptr<scalar_t>(), feats.stride(0), args.labels, N, D, K, L, rows_per_chunk, shared_table,
        args.sums);
  }

  // Chunks of samples, each projected into a scratch buffer, then scored, decided and summed (add_chunk).
  template <typename scalar_t>
  static void residual_stats(const at::Tensor& feats, const ResidualTensors& t, const ResidualInputs& in,
                             const ResidualOutputs& out) {
    const int64_t N = in.N, P = t.proj.size(0);
    const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(N, kScratchBytes / ((P + in.K + 1) * 8)));
    const at::Tensor products = at::empty({chunk, P}, out.class_sq.options());
    const at::Tensor r_sq = at::empty({chunk}, out.class_sq.options());
    const int64_t per_block = kWarps * kWarpSamples;
    for (int64_t start = 0; start < N; start += chunk) {
      const int64_t rows = std::min(chunk, N - start);
      device::launch(project_residuals_kernel<scalar_t>, static_cast<unsigned>((rows + per_block - 1) / per_block),
                     kWarps * 32, 0, device::current_stream())(
          feats.data_ptr<scalar_t>() + start * feats.stride(0), feats.stride(0), in.labels + start, rows, in.D, in.K,
          in.means, in.proj, P, products.data_ptr<double>(), r_sq.data_ptr<double>());
      add_chunk<CudaBackend, scalar_t>(products.narrow(0, 0, rows), r_sq.narrow(0, 0, rows), feats, t, in, start, out);
    }
  }

  template <typename scalar_t>
  static void sample_decisions(const at::Tensor& scores, const at::Tensor& products, const at::Tensor& r_sq,
                               const at::Tensor& feats, const ResidualInputs& in, int64_t start,
                               const at::Tensor& decisions) {
    const int64_t rows = scores.size(0);
    device::launch(sample_decisions_kernel<scalar_t>, static_cast<unsigned>((rows + 255) / 256), 256, 0,
                   device::current_stream())(
        scores.data_ptr<double>(), products.data_ptr<double>(), r_sq.data_ptr<double>(), feats.data_ptr<scalar_t>(),
        feats.stride(0), in, start, rows, products.size(1),
        reinterpret_cast<unsigned long long*>(decisions.data_ptr<int64_t>()));
  }
};

}  // namespace

PFC_DEVICE_LIBRARY_IMPL(m) {
  m.impl("class_sums", &class_sums_op<CudaBackend>);
  m.impl("residual_stats", &residual_stats_op<CudaBackend>);
}

}  // namespace pfc_fast

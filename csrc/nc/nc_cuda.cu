// CUDA kernels of the two passes of the exact NC metrics (docs/spec.md section 3); the CPU twins and the
// formulas are in nc_cpu.cpp.
//
// Pass 1 (class_sums_kernel): a block owns blockDim.x feature columns and a chunk of rows; each
// thread owns one column, so it accumulates into its own slot of a shared-memory K x blockDim
// table without atomics, then adds the table to the float64 sums with one atomic per entry.
//
// Pass 2: project_residuals_kernel reads every feature once per tile of 8 projection rows: a warp
// handles 4 samples, its lanes stride over the columns, forming r = h - mu_y in float64 and
// accumulating s = proj r (4 x 8 register tile) and ||r||^2, reduced over the warp. The
// projections of a chunk of rows go to a scratch buffer (rows x (P + 1), far smaller than the
// features when P << D); sample_decisions_kernel then takes the nearest-class-centre and
// classifier decisions and per-class traces, and the K x K accumulation is a cuBLAS product of
// the scratch with itself.
//
// The same source builds for the SIMT layer (device.h); run there, the K x K product is a CPU BLAS
// call instead of cuBLAS.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>

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

template <typename scalar_t>
__device__ __forceinline__ double as_double(scalar_t v) {
  return static_cast<double>(static_cast<float>(v));
}
template <>
__device__ __forceinline__ double as_double<double>(double v) {
  return v;
}

// The float64 atomicAdds into sums arrive in a different order on every GPU run, so the last bits of
// the sums vary; the SIMT layer shuffles the blocks but runs a block's threads one at a time, so it
// reproduces only part of that variation (the tests compare at 1e-12, not bitwise).
template <typename scalar_t>
__global__ void class_sums_kernel(const scalar_t* __restrict__ x, int64_t row_stride,
                                  const int64_t* __restrict__ labels, int64_t N, int64_t D, int64_t K,
                                  int64_t rows_per_chunk, bool shared_table, double* __restrict__ sums) {
  PFC_DYNAMIC_SHARED(double, table);  // K x blockDim.x when shared_table
  const int tid = threadIdx.x;
  const int64_t d = static_cast<int64_t>(blockIdx.x) * blockDim.x + tid;
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t i1 = min(N, i0 + rows_per_chunk);
  if (d >= D) return;  // no block-wide synchronisation below: each thread owns its column
  if (shared_table) {
    for (int64_t k = 0; k < K; ++k) table[k * blockDim.x + tid] = 0.0;
  }
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t y = labels[i];
    if (y < 0 || y >= K) continue;  // rejected on the host; never index out of bounds
    const double v = as_double(x[i * row_stride + d]);
    if (shared_table) {
      table[y * blockDim.x + tid] += v;
    } else {
      atomicAdd(sums + y * D + d, v);
    }
  }
  if (shared_table) {
    for (int64_t k = 0; k < K; ++k) {
      const double v = table[k * blockDim.x + tid];
      if (v != 0.0) atomicAdd(sums + k * D + d, v);
    }
  }
}

// Projections of a chunk of samples: out[i, p] = proj[p] . r_i for p < P, out[i, P] = ||r_i||^2.
template <typename scalar_t>
__global__ void project_residuals_kernel(const scalar_t* __restrict__ x, int64_t row_stride,
                                         const int64_t* __restrict__ labels, int64_t rows, int64_t D,
                                         int64_t K, const double* __restrict__ means,
                                         const double* __restrict__ proj, int64_t P, double* __restrict__ out) {
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
        if (lane == 0 && valid[s] && p0 + q < P) out[(first + s) * (P + 1) + p0 + q] = v;
      }
    }
  }
#pragma unroll
  for (int s = 0; s < kWarpSamples; ++s) {
    double v = sq[s];
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
    if (lane == 0 && valid[s]) out[(first + s) * (P + 1) + P] = v;
  }
}

// Per-sample decisions from the projections (the schema of residual_stats in csrc/schemas.h). As in
// class_sums_kernel, the order of the atomicAdds into class_sq is the GPU's, not reproduced exactly.
__global__ void sample_decisions_kernel(const double* __restrict__ proj_out, const int64_t* __restrict__ labels,
                                        int64_t rows, int64_t K, int64_t num_logits,
                                        const double* __restrict__ ncc_bias, const double* __restrict__ logit_offset,
                                        const int64_t* __restrict__ predictions, double* __restrict__ class_sq,
                                        unsigned long long* __restrict__ decisions) {
  PFC_SHARED(unsigned long long, block_counts, [2]);
  if (threadIdx.x < 2) block_counts[threadIdx.x] = 0;
  __syncthreads();
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t P = K + num_logits;
  if (i < rows) {
    const int64_t y = labels[i];
    if (y >= 0 && y < K) {
      const double* s = proj_out + i * (P + 1);
      int64_t ncc = 0;
      double best = INFINITY;
      for (int64_t c = 0; c < K; ++c) {
        const double v = ncc_bias[y * K + c] - 2.0 * s[c];
        if (v < best) {
          best = v;
          ncc = c;
        }
      }
      if (ncc == y) atomicAdd(&block_counts[0], 1ull);
      int64_t decided = -1;
      if (logit_offset != nullptr) {
        double top = -INFINITY;
        for (int64_t j = 0; j < num_logits; ++j) {
          const double v = s[K + j] + logit_offset[y * num_logits + j];
          if (v > top) {
            top = v;
            decided = j;
          }
        }
      } else if (predictions != nullptr) {
        decided = predictions[i];
      }
      if ((logit_offset != nullptr || predictions != nullptr) && ncc != decided) atomicAdd(&block_counts[1], 1ull);
      atomicAdd(class_sq + y, s[P]);
    }
  }
  __syncthreads();
  if (threadIdx.x < 2 && block_counts[threadIdx.x] != 0) atomicAdd(decisions + threadIdx.x, block_counts[threadIdx.x]);
}

std::tuple<at::Tensor, at::Tensor> class_sums_cuda(const at::Tensor& feats_in, const at::Tensor& labels_in,
                                                   int64_t num_classes) {
  check_feats_labels(feats_in, labels_in);
  const device::Guard guard(feats_in.device());
  const at::Tensor feats = with_contiguous_rows(feats_in);
  const at::Tensor labels = labels_in.contiguous();
  at::Tensor counts = class_counts(labels, num_classes);
  at::Tensor sums = at::zeros({num_classes, feats.size(1)}, feats.options().dtype(at::kDouble));
  const int64_t N = feats.size(0), D = feats.size(1);
  if (N == 0 || D == 0) return {sums, counts};  // (no blocks; D = 0 would also divide by 0 below)
  const bool shared_table = num_classes * kSumThreads * static_cast<int64_t>(sizeof(double)) <= kSharedBytes;
  const int64_t col_blocks = (D + kSumThreads - 1) / kSumThreads;
  const int64_t wanted = std::max<int64_t>(1, 8 * device::multiprocessor_count(feats) / col_blocks);
  const int64_t chunks = std::min<int64_t>({wanted, (N + 31) / 32, 65535});
  const int64_t rows_per_chunk = (N + chunks - 1) / chunks;
  const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>((N + rows_per_chunk - 1) / rows_per_chunk));
  const size_t shared = shared_table ? num_classes * kSumThreads * sizeof(double) : 0;
  const cudaStream_t stream = device::current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(), "class_sums_cuda", [&] {
    device::launch(class_sums_kernel<scalar_t>, grid, kSumThreads, shared, stream)(
        feats.data_ptr<scalar_t>(), feats.stride(0), labels.data_ptr<int64_t>(), N, D, num_classes, rows_per_chunk,
        shared_table, sums.data_ptr<double>());
  });
  return {sums, counts};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> residual_stats_cuda(
    const at::Tensor& feats_in, const at::Tensor& labels_in, const at::Tensor& means_in,
    const at::Tensor& proj_in, const at::Tensor& ncc_bias_in, const c10::optional<at::Tensor>& logit_offset_in,
    const c10::optional<at::Tensor>& predictions_in) {
  const auto [K, num_logits] =
      check_residual_args(feats_in, labels_in, means_in, proj_in, ncc_bias_in, logit_offset_in, predictions_in);
  const device::Guard guard(feats_in.device());
  const at::Tensor feats = with_contiguous_rows(feats_in);
  const at::Tensor labels = labels_in.contiguous();
  class_counts(labels, K);  // validates the label range
  const at::Tensor means = means_in.contiguous(), proj = proj_in.contiguous(), ncc_bias = ncc_bias_in.contiguous();
  const at::Tensor logit_offset = logit_offset_in.has_value() ? logit_offset_in->contiguous() : at::Tensor();
  const at::Tensor predictions = predictions_in.has_value() ? predictions_in->contiguous() : at::Tensor();
  const int64_t N = feats.size(0), D = feats.size(1), P = K + num_logits;

  const auto f64 = feats.options().dtype(at::kDouble);
  at::Tensor gram = at::zeros({K, K}, f64);
  at::Tensor class_sq = at::zeros({K}, f64);
  at::Tensor decisions = at::zeros({2}, feats.options().dtype(at::kLong));
  if (N == 0) return {gram, class_sq, decisions};

  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(N, kScratchBytes / ((P + 1) * 8)));
  at::Tensor scratch = at::empty({chunk, P + 1}, f64);
  const cudaStream_t stream = device::current_stream();
  for (int64_t start = 0; start < N; start += chunk) {
    const int64_t rows = std::min(chunk, N - start);
    const at::Tensor part_labels = labels.narrow(0, start, rows);
    const int64_t per_block = kWarps * kWarpSamples;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(), "residual_stats_cuda", [&] {
      device::launch(project_residuals_kernel<scalar_t>, static_cast<unsigned>((rows + per_block - 1) / per_block),
                     kWarps * 32, 0, stream)(
          feats.data_ptr<scalar_t>() + start * feats.stride(0), feats.stride(0), part_labels.data_ptr<int64_t>(), rows, D,
          K, means.data_ptr<double>(), proj.data_ptr<double>(), P, scratch.data_ptr<double>());
    });
    device::launch(sample_decisions_kernel, static_cast<unsigned>((rows + 255) / 256), 256, 0, stream)(
        scratch.data_ptr<double>(), part_labels.data_ptr<int64_t>(), rows, K, num_logits, ncc_bias.data_ptr<double>(),
        logit_offset.defined() ? logit_offset.data_ptr<double>() : nullptr,
        predictions.defined() ? predictions.data_ptr<int64_t>() + start : nullptr, class_sq.data_ptr<double>(),
        reinterpret_cast<unsigned long long*>(decisions.data_ptr<int64_t>()));
    const at::Tensor z = scratch.narrow(0, 0, rows).narrow(1, 0, K);
    gram.addmm_(z.t(), z);
  }
  return {gram, class_sq, decisions};
}

}  // namespace

PFC_DEVICE_LIBRARY_IMPL(m) {
  m.impl("class_sums", &class_sums_cuda);
  m.impl("residual_stats", &residual_stats_cuda);
}

}  // namespace pfc_fast

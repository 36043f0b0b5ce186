// CUDA kernels of the Sinkhorn ops (docs/spec.md section 4; schemas in schemas.h; the CPU twin, with
// the formulas, is sinkhorn_cpu.cpp). Both ops sweep the pairs (i, j) once and fold each row: a
// running log-sum-exp of v_ij = log_w_j + h_j / eps - C_ij / eps (sinkhorn_softmin), or the row
// mass and cost of the plan exp((f_i + h_j - C_ij) / eps + log_a_i + log_w_j) (sinkhorn_plan_sums).
// A Fold takes its column's terms from Fold::column(h_j, log_w_j, 1 / eps), formed once per column.
//
// Online mode, in the manner of FlashAttention: a block of 256 threads owns kTileRows = 64 rows of
// x and sweeps the columns in tiles of kTileCols = 64 points of y. For each tile the x and y
// slices (kChunk coordinates at a time) are staged in shared memory, transposed, and every thread
// accumulates a 4 x 4 register tile of dot products, turns them into
// C = max(|x_i|^2 + |y_j|^2 - 2 x_i.y_j, 0) and v, and folds them into its own partial fold of its
// 4 rows. At the end the 16 threads that share a row combine their partial folds with warp
// shuffles. Nothing of size N x M exists. Dense mode: one warp per row of the given cost matrix,
// each lane folding a strided subset of the columns, combined with shuffles. The stabilised-scaling
// ops (sinkhorn_kernel, sinkhorn_scaling_step) are at the end, before the backend.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>

#include "sinkhorn/sinkhorn_common.h"
#include "common/device.h"

namespace pfc_fast {
namespace {

constexpr int kTileRows = 64;
constexpr int kTileCols = 64;
constexpr int kChunk = 16;     // coordinates staged per step
constexpr int kThreads = 256;  // 16 x 16 threads, each a 4 x 4 register tile
constexpr int kMicro = 4;
static_assert(kTileRows == kTileCols, "one staging loop loads both tiles");
static_assert(kThreads == (kTileRows / kMicro) * (kTileCols / kMicro), "one register tile per thread");

template <typename T>
__device__ __forceinline__ T exp_(T v);
template <>
__device__ __forceinline__ float exp_<float>(float v) {
  return expf(v);
}
template <>
__device__ __forceinline__ double exp_<double>(double v) {
  return exp(v);
}

// Running log-sum-exp: value = max + log(sum); sum = 0 while empty. Writes -eps * value. Exact
// in one pass already (rescaled when the maximum grows), so the shift of the op is not needed.
template <typename T>
struct SoftminFold {
  using Args = SoftminArgs<T>;
  using Column = T;  // log_w_j + h_j / eps
  static __device__ Column column(T h, T log_w, T inv_eps) { return log_w + h * inv_eps; }
  T max;
  T sum;

  __device__ SoftminFold(const Args&, int64_t) : max(-INFINITY), sum(0) {}

  __device__ void add(Column term, T c, T inv_eps) {
    const T v = term - c * inv_eps;
    if (v == -INFINITY) return;  // zero weight
    if (v <= max) {
      sum += exp_(v - max);
    } else {
      sum = sum * exp_(max - v) + T(1);  // sum = 0 * exp(-inf) on the first value
      max = v;
    }
  }
  __device__ void merge(T other_max, T other_sum) {
    if (other_sum == T(0)) return;
    if (sum == T(0)) {
      max = other_max;
      sum = other_sum;
    } else if (other_max <= max) {
      sum += other_sum * exp_(other_max - max);
    } else {
      sum = sum * exp_(max - other_max) + other_sum;
      max = other_max;
    }
  }
  // Combines the partial folds of the `width` lanes of a shuffle group (all 32 lanes call it).
  __device__ void reduce(int width) {
    for (int offset = width / 2; offset > 0; offset >>= 1) {
      const T m = __shfl_xor_sync(0xffffffffu, max, offset, width);
      const T s = __shfl_xor_sync(0xffffffffu, sum, offset, width);
      merge(m, s);
    }
  }
  __device__ void finish(const Args& args, int64_t row) const { args.out[row] = -args.eps * (max + log(sum)); }
};

// Row mass and cost of the plan P_ij = exp(((f_i + g_j) - C_ij) / eps + log a_i + log b_j).
template <typename T>
struct PlanFold {
  using Args = PlanArgs<T>;
  struct Column {
    T g, log_b;
  };
  static __device__ Column column(T h, T log_w, T) { return {h, log_w}; }
  T f;
  T log_a;
  T mass;
  T cost;

  __device__ PlanFold(const Args& args, int64_t row) : f(args.f[row]), log_a(args.log_a[row]), mass(0), cost(0) {}

  __device__ void add(Column col, T c, T inv_eps) {
    if (col.log_b == -INFINITY) return;
    const T p = exp_(((f + col.g) - c) * inv_eps + (log_a + col.log_b));
    mass += p;
    cost += p * c;
  }
  __device__ void reduce(int width) {
    for (int offset = width / 2; offset > 0; offset >>= 1) {
      mass += __shfl_xor_sync(0xffffffffu, mass, offset, width);
      cost += __shfl_xor_sync(0xffffffffu, cost, offset, width);
    }
  }
  __device__ void finish(const Args& args, int64_t row) const {
    args.mass[row] = mass;
    args.cost[row] = cost;
  }
};

template <typename T, typename Fold>
__global__ void sweep_online_kernel(const T* __restrict__ x, const T* __restrict__ y, const T* __restrict__ sq_x,
                                    const T* __restrict__ sq_y, const T* __restrict__ h,
                                    const T* __restrict__ log_w, int64_t rows, int64_t cols, int64_t dim, T eps,
                                    typename Fold::Args args) {
  PFC_SHARED(T, xs, [kChunk][kTileRows]);
  PFC_SHARED(T, ys, [kChunk][kTileCols]);
  const int64_t b = blockIdx.y;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  x += b * rows * dim;
  y += b * cols * dim;
  sq_x += b * rows;
  sq_y += b * cols;
  h += b * cols;
  log_w += b * cols;
  const T inv_eps = T(1) / eps;

  T my_sq_x[kMicro];
  Fold folds[kMicro] = {Fold(args, 0), Fold(args, 0), Fold(args, 0), Fold(args, 0)};
  for (int r = 0; r < kMicro; ++r) {
    const int64_t i = row0 + ty * kMicro + r;
    my_sq_x[r] = i < rows ? sq_x[i] : T(0);
    if (i < rows) folds[r] = Fold(args, b * rows + i);
  }
  for (int64_t col0 = 0; col0 < cols; col0 += kTileCols) {
    T acc[kMicro][kMicro] = {};
    for (int64_t d0 = 0; d0 < dim; d0 += kChunk) {
      for (int e = tid; e < kTileRows * kChunk; e += kThreads) {
        const int r = e / kChunk, d = e % kChunk;
        const int64_t i = row0 + r, j = col0 + r;
        xs[d][r] = (i < rows && d0 + d < dim) ? x[i * dim + d0 + d] : T(0);
        ys[d][r] = (j < cols && d0 + d < dim) ? y[j * dim + d0 + d] : T(0);
      }
      __syncthreads();
#pragma unroll
      for (int d = 0; d < kChunk; ++d) {
        T xv[kMicro], yv[kMicro];
#pragma unroll
        for (int q = 0; q < kMicro; ++q) {
          xv[q] = xs[d][ty * kMicro + q];
          yv[q] = ys[d][tx * kMicro + q];
        }
#pragma unroll
        for (int r = 0; r < kMicro; ++r)
#pragma unroll
          for (int c = 0; c < kMicro; ++c) acc[r][c] += xv[r] * yv[c];
      }
      __syncthreads();
    }
#pragma unroll
    for (int c = 0; c < kMicro; ++c) {
      const int64_t j = col0 + tx * kMicro + c;
      if (j >= cols) continue;
      const auto term = Fold::column(h[j], log_w[j], inv_eps);
      const T sq = sq_y[j];
#pragma unroll
      for (int r = 0; r < kMicro; ++r) {
        const T cost = fmax(my_sq_x[r] + sq - T(2) * acc[r][c], T(0));
        folds[r].add(term, cost, inv_eps);
      }
    }
  }
  // The 16 threads with the same ty (16 consecutive lanes) share these rows.
#pragma unroll
  for (int r = 0; r < kMicro; ++r) {
    folds[r].reduce(16);
    const int64_t i = row0 + ty * kMicro + r;
    if (tx == 0 && i < rows) folds[r].finish(args, b * rows + i);
  }
}

template <typename T, typename Fold>
__global__ void sweep_dense_kernel(const T* __restrict__ cost, const T* __restrict__ h, const T* __restrict__ log_w,
                                   int64_t batch_rows, int64_t rows, int64_t cols, T eps, typename Fold::Args args) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= batch_rows) return;  // whole warp
  const int64_t b = row / rows;
  const T* c = cost + row * cols;
  const T* hb = h + b * cols;
  const T* wb = log_w + b * cols;
  const T inv_eps = T(1) / eps;
  Fold fold(args, row);
  for (int64_t j = lane; j < cols; j += 32) fold.add(Fold::column(hb[j], wb[j], inv_eps), c[j], inv_eps);
  fold.reduce(32);
  if (lane == 0) fold.finish(args, row);
}

template <typename T, typename Fold>
__global__ void sweep_columns_kernel(const T* __restrict__ cost, const T* __restrict__ h,
                                     const T* __restrict__ log_w, int64_t outs, int64_t sums, T eps,
                                     typename Fold::Args args) {
  const int64_t b = blockIdx.y;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= outs) return;
  const T* c = cost + b * sums * outs + j;
  const T* hb = h + b * sums;
  const T* wb = log_w + b * sums;
  const T inv_eps = T(1) / eps;
  Fold fold(args, b * outs + j);
  for (int64_t i = 0; i < sums; ++i) fold.add(Fold::column(hb[i], wb[i], inv_eps), c[i * outs], inv_eps);
  fold.finish(args, b * outs + j);
}

// sinkhorn_kernel (schemas.h): one thread per entry, exp of the plan's exponent (0 and inf beyond
// the dtype's range, as exp gives them).
template <typename T>
__global__ void build_kernel_kernel(KernelArgs<T> s) {
  const int64_t total = s.batch * s.rows * s.cols;
  const T inv_eps = T(1) / s.eps;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < total;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = k / s.cols, j = k % s.cols;
    s.kernel[k] = exp_(((s.f[r] + s.g[(r / s.rows) * s.cols + j]) - s.cost[k]) * inv_eps);
  }
}

// sinkhorn_scaling_step (schemas.h), first kernel: a block of kThreads threads owns kScalingRows
// rows of one problem. Each warp takes rows in turn: its lanes form the dot product s_i = sum_j
// K_ij b_j v_j (strided, combined with shuffles), lane 0 writes u'_i = 1 / s_i and the row's
// marginal error a_i |u_i s_i - 1|, and keeps a_i u'_i in shared memory. Then the block adds its
// rows, still in L1 / L2, times a_i u'_i column by column (coalesced) into its partial column sums
// partial (B, blocks, M): K is read from memory once per iteration.
constexpr int kScalingRows = 32;

template <typename T>
__global__ void scaling_rows_kernel(ScalingArgs<T> s, T* __restrict__ row_error, T* __restrict__ partial,
                                    int64_t blocks) {
  PFC_SHARED(T, weight, [kScalingRows]);
  const int64_t b = blockIdx.y, row0 = static_cast<int64_t>(blockIdx.x) * kScalingRows;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const T* kernel = s.kernel + b * s.rows * s.cols;
  const T* bb = s.b + b * s.cols;
  const T* vb = s.v + b * s.cols;
  for (int r = warp; r < kScalingRows; r += kThreads / 32) {
    const int64_t i = row0 + r;
    if (i >= s.rows) {
      if (lane == 0) weight[r] = T(0);
      continue;  // the whole warp
    }
    const T* row = kernel + i * s.cols;
    T sum = 0;
    for (int64_t j = lane; j < s.cols; j += 32) sum += row[j] * (bb[j] * vb[j]);
    for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (lane == 0) {
      const int64_t k = b * s.rows + i;
      const T u = T(1) / sum;
      s.u_out[k] = u;
      row_error[k] = s.a[k] * fabs(s.u[k] * sum - T(1));
      weight[r] = s.a[k] * u;
    }
  }
  __syncthreads();
  const int n = s.rows - row0 < kScalingRows ? static_cast<int>(s.rows - row0) : kScalingRows;
  T* out = partial + (b * blocks + blockIdx.x) * s.cols;
  for (int64_t j = threadIdx.x; j < s.cols; j += kThreads) {
    T sum = 0;
    for (int r = 0; r < n; ++r) sum += kernel[(row0 + r) * s.cols + j] * weight[r];
    out[j] = sum;
  }
}

// Second kernel: v'_j = 1 / (the blocks' partial sums of column j added up).
template <typename T>
__global__ void scaling_columns_kernel(ScalingArgs<T> s, const T* __restrict__ partial, int64_t blocks) {
  const int64_t b = blockIdx.y, j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= s.cols) return;
  T sum = 0;
  for (int64_t k = 0; k < blocks; ++k) sum += partial[(b * blocks + k) * s.cols + j];
  s.v_out[b * s.cols + j] = T(1) / sum;
}

// The backend of sinkhorn_softmin_op and sinkhorn_plan_sums_op (sinkhorn_common.h): sweep runs a
// Fold over all pairs, online from x and y or dense from cost.
struct CudaBackend {
  template <typename T>
  using SoftminFold = pfc_fast::SoftminFold<T>;
  template <typename T>
  using PlanFold = pfc_fast::PlanFold<T>;
  static device::Guard guard(const at::Tensor& t) { return device::Guard(t.device()); }

  template <typename T>
  static void kernel(const KernelArgs<T>& s) {
    const int64_t total = s.batch * s.rows * s.cols;
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((total + 255) / 256, 65535));
    device::launch(build_kernel_kernel<T>, blocks, 256, 0, device::current_stream())(s);
  }

  // The two kernels above, then status from the row errors and the new scalings (scaling_spread's
  // rule, in tensor operations).
  template <typename T>
  static void scaling_step(const ScalingArgs<T>& s, const at::TensorOptions& options) {
    TORCH_CHECK(s.batch <= 65535, "pfc_fast: at most 65535 problems per batch on CUDA");
    const cudaStream_t stream = device::current_stream();
    const int64_t blocks = (s.rows + kScalingRows - 1) / kScalingRows;
    at::Tensor row_error = at::empty({s.batch, s.rows}, options);
    at::Tensor partial = at::empty({s.batch, blocks, s.cols}, options);
    device::launch(scaling_rows_kernel<T>, dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(s.batch)),
                   kThreads, 0, stream)(s, row_error.data_ptr<T>(), partial.data_ptr<T>(), blocks);
    device::launch(scaling_columns_kernel<T>,
                   dim3(static_cast<unsigned>((s.cols + 255) / 256), static_cast<unsigned>(s.batch)), 256, 0,
                   stream)(s, partial.data_ptr<T>(), blocks);
    const at::Tensor scalings = at::cat({at::from_blob(s.u_out, {s.batch, s.rows}, options),
                                         at::from_blob(s.v_out, {s.batch, s.cols}, options)}, 1);
    const at::Tensor usable = ((scalings > 0) & (scalings < std::numeric_limits<T>::infinity())).all(1);
    const at::Tensor spread = at::where(usable, scalings.log2().abs().amax(1),
                                        at::full({s.batch}, std::numeric_limits<T>::infinity(), options));
    at::from_blob(s.status, {s.batch, 2}, options).copy_(at::stack({row_error.sum(1), spread}, 1));
  }

  template <typename T, typename Fold>
  static void sweep(const c10::optional<at::Tensor>& x, const c10::optional<at::Tensor>& y,
                    const c10::optional<at::Tensor>& cost, const at::Tensor& h, const at::Tensor& log_w, T eps,
                    const SoftminShape& shape, const typename Fold::Args& args) {
    TORCH_CHECK(shape.batch <= 65535, "pfc_fast: at most 65535 problems per batch on CUDA");
    const cudaStream_t stream = device::current_stream();
    if (cost.has_value() && shape.transpose) {
      const at::Tensor c = cost->contiguous();
      const dim3 grid(static_cast<unsigned>((shape.rows + 255) / 256), static_cast<unsigned>(shape.batch));
      device::launch(sweep_columns_kernel<T, Fold>, grid, 256, 0, stream)(c.data_ptr<T>(), h.data_ptr<T>(),
                                                                         log_w.data_ptr<T>(), shape.rows, shape.cols,
                                                                         eps, args);
      return;
    }
    if (cost.has_value()) {
      const at::Tensor c = cost->contiguous();
      const int64_t batch_rows = shape.batch * shape.rows;
      constexpr int warps = 8;
      device::launch(sweep_dense_kernel<T, Fold>, static_cast<unsigned>((batch_rows + warps - 1) / warps), warps * 32,
                     0, stream)(c.data_ptr<T>(), h.data_ptr<T>(), log_w.data_ptr<T>(), batch_rows, shape.rows,
                                shape.cols, eps, args);
      return;
    }
    const at::Tensor xc = x->contiguous(), yc = y->contiguous();
    const at::Tensor sq_x = (xc * xc).sum(2), sq_y = (yc * yc).sum(2);
    const dim3 grid(static_cast<unsigned>((shape.rows + kTileRows - 1) / kTileRows), static_cast<unsigned>(shape.batch));
    device::launch(sweep_online_kernel<T, Fold>, grid, kThreads, 0, stream)(
        xc.data_ptr<T>(), yc.data_ptr<T>(), sq_x.data_ptr<T>(), sq_y.data_ptr<T>(), h.data_ptr<T>(),
        log_w.data_ptr<T>(), shape.rows, shape.cols, shape.dim, eps, args);
  }
};

}  // namespace

PFC_DEVICE_LIBRARY_IMPL(m) {
  m.impl("sinkhorn_softmin", &sinkhorn_softmin_op<CudaBackend>);
  m.impl("sinkhorn_plan_sums", &sinkhorn_plan_sums_op<CudaBackend>);
  m.impl("sinkhorn_kernel", &sinkhorn_kernel_op<CudaBackend>);
  m.impl("sinkhorn_scaling_step", &sinkhorn_scaling_step_op<CudaBackend>);
}

}  // namespace pfc_fast

// CPU kernels of the Sinkhorn ops (docs/spec.md section 4; schemas in schemas.h). Both sweep the
// pairs (i, j) once, forming
//
//   v_ij = col_j - C_ij / eps,   col_j = log_w_j + h_j / eps,
//
// and fold every row as they go, so nothing of size N x M is stored:
//   sinkhorn_softmin:    out_i = -eps * log sum_j exp(v_ij)
//   sinkhorn_plan_sums:  with P_ij = exp((f_i + g_j - C_ij) / eps + log a_i + log b_j) (h = g,
//                        log_w = log b; the potentials' sum against the cost first, see PlanArgs),
//                        mass_i = sum_j P_ij and cost_i = sum_j P_ij C_ij.
// The kernels work in base 2 (values u = v log2 e, vec_pow2). The log-sum-exp takes one pass when
// a shift (an estimate of out: the previous potential) is given: sum_j 2^(u_ij - m_i) with
// m_i = -shift_i log2 e / eps, accepted when the sum is in a range where no term that matters was
// clamped, else redone exactly (block maximum, then the sum).
// The stabilised-scaling solver's ops work on a stored kernel K = exp((f + g - C) / eps) instead:
// sinkhorn_kernel forms it in one sweep, sinkhorn_scaling_step runs one iteration in one read of it.
// Online mode computes C_ij = max(|x_i|^2 + |y_j|^2 - 2 x_i.y_j, 0) in register tiles of kRows
// rows x kCols columns (the dot products over d accumulate in registers); dense mode reads rows
// of a given C, or with transpose its columns (vectorised over the outputs), so one matrix serves
// both half-steps.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "sinkhorn/sinkhorn_common.h"
#include "common/grain.h"

#include "common/cpu_isa.h"

PFC_CPU_ISA_BEGIN
#include "sinkhorn/vec_pow2.h"
namespace pfc_fast {
namespace PFC_CPU_ISA {
namespace {

constexpr int kRows = 4;  // rows of x per register tile

// A 64-byte vector of T (GCC/Clang vector extension; split into narrower registers without AVX-512).
template <typename T>
using Vec [[gnu::vector_size(64)]] = T;

template <typename T>
constexpr int kLanes = 64 / sizeof(T);

template <typename T>
constexpr int kCols = 2 * kLanes<T>;  // columns per register tile: two vectors

template <typename T>
constexpr int kSpan = 8 * kCols<T>;  // columns folded at a time

template <typename T>
inline Vec<T> load_vec(const T* p) {
  Vec<T> v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
constexpr T kNegInf = -std::numeric_limits<T>::infinity();

// Sums of 2^(u - m) accepted with a guessed shift m: inside (kLow, kHigh) every term above 2^-60
// (float) relative to the largest is exact (no clamping in vec_pow2) and none overflowed.
template <typename T>
constexpr T kLowSum = sizeof(T) == 4 ? T(1e-20) : T(1e-200);
template <typename T>
constexpr T kHighSum = sizeof(T) == 4 ? T(1e20) : T(1e200);

template <typename T>
inline bool accepted_sum(T sum) {
  return sum > kLowSum<T> && sum < kHighSum<T>;
}

// A Fold consumes the pairs of one row, a block at a time: add(terms, stride, cost, n, scale) with
// its column terms (Fold::columns: kColumnArrays arrays of `stride` per problem, `terms` at the
// block's first column of the first one) and scale = log2 e / eps, then finish(args, row) writes
// the row's result and returns false when the row must be redone with a Fold constructed with
// exact = true.

// Row fold of sinkhorn_softmin. With a shift: one pass, sum of 2^(u - m) at the guessed m.
// Exact: a running log-sum-exp (block maximum, rescaled sum); u is formed twice, for the block
// maximum and for the sum, rather than stored.
template <typename T>
struct SoftminFold {
  using Args = SoftminArgs<T>;
  // One column array, (log_w_j + h_j / eps) log2 e (-inf in the padding, i.e. weight 0): the
  // base-2 values are u_j = terms_j - cost_j * scale.
  static constexpr int kColumnArrays = 1;
  static std::vector<T> columns(const T* h, const T* log_w, int64_t batch, int64_t cols, int64_t stride, T eps) {
    std::vector<T> terms(batch * stride, kNegInf<T>);
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t j = 0; j < cols; ++j) {
        terms[b * stride + j] = (log_w[b * cols + j] + h[b * cols + j] / eps) * static_cast<T>(kLog2e);
      }
    }
    return terms;
  }
  bool guessed;
  T max;
  T sum = 0;

  SoftminFold(const Args& args, int64_t row, bool exact)
      : guessed(!exact && args.shift != nullptr),
        max(guessed ? -args.shift[row] * static_cast<T>(kLog2e) / args.eps : kNegInf<T>) {}

  void add(const T* terms, int64_t, const T* cost, int64_t n, T scale) {
    if (guessed) {
      const T m = max;
      T s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < n; ++j) s += vec_pow2<T>(terms[j] - cost[j] * scale - m);
      sum += s;
      return;
    }
    T block_max = kNegInf<T>;
#pragma omp simd reduction(max : block_max)
    for (int64_t j = 0; j < n; ++j) {
      const T u = terms[j] - cost[j] * scale;
      block_max = u > block_max ? u : block_max;
    }
    if (block_max == kNegInf<T>) return;  // zero weights only
    if (block_max > max) {
      sum = max == kNegInf<T> ? T(0) : sum * vec_pow2<T, true>(max - block_max);
      max = block_max;
    }
    const T m = max;
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < n; ++j) s += vec_pow2<T, true>(terms[j] - cost[j] * scale - m);
    sum += s;
  }

  bool finish(const Args& args, int64_t row) const {
    if (guessed && !accepted_sum(sum)) return false;
    args.out[row] = -args.eps * static_cast<T>(kLn2) * (max + std::log2(sum));
    return true;
  }
};

// Row fold of sinkhorn_plan_sums: mass and cost of one row of the plan
// P_ij = 2^(((f_i + g_j) - C_ij) scale + (log a_i + log b_j) log2 e).
template <typename T>
struct PlanFold {
  using Args = PlanArgs<T>;
  // Two column arrays: g_j, then log b_j log2 e (-inf in the padding).
  static constexpr int kColumnArrays = 2;
  static std::vector<T> columns(const T* h, const T* log_w, int64_t batch, int64_t cols, int64_t stride, T) {
    std::vector<T> terms(batch * 2 * stride, T(0));
    for (int64_t b = 0; b < batch; ++b) {
      std::fill(terms.begin() + (2 * b + 1) * stride, terms.begin() + (2 * b + 2) * stride, kNegInf<T>);
      for (int64_t j = 0; j < cols; ++j) {
        terms[2 * b * stride + j] = h[b * cols + j];
        terms[(2 * b + 1) * stride + j] = log_w[b * cols + j] * static_cast<T>(kLog2e);
      }
    }
    return terms;
  }
  T f;
  T log_a;  // log a_i log2 e
  T mass = 0;
  T cost = 0;

  PlanFold(const Args& args, int64_t row, bool)
      : f(args.f[row]), log_a(args.log_a[row] * static_cast<T>(kLog2e)) {}

  void add(const T* terms, int64_t stride, const T* c, int64_t n, T scale) {
    const T* log_b = terms + stride;
    T m = 0, k = 0;
    const T fi = f, la = log_a;
#pragma omp simd reduction(+ : m, k)
    for (int64_t j = 0; j < n; ++j) {
      const T p = log_b[j] == kNegInf<T> ? T(0) : vec_pow2<T>(((fi + terms[j]) - c[j]) * scale + (la + log_b[j]));
      m += p;
      k += p * c[j];
    }
    mass += m;
    cost += k;
  }

  bool finish(const Args& args, int64_t row) const {
    args.mass[row] = mass;
    args.cost[row] = cost;
    return true;
  }
};

// The factor of C_ij in the base-2 values u_ij.
template <typename T>
T cost_scale(T eps) {
  return static_cast<T>(kLog2e) / eps;
}

template <typename T, typename Fold>
void sweep_dense(const T* cost, const std::vector<T>& terms, int64_t batch, int64_t rows, int64_t cols, T eps,
                 const typename Fold::Args& args) {
  const T scale = cost_scale(eps);
  at::parallel_for(0, batch * rows, grain_for(cols), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* t = terms.data() + (r / rows) * Fold::kColumnArrays * cols;
      for (const bool exact : {false, true}) {
        Fold fold(args, r, exact);
        fold.add(t, cols, cost + r * cols, cols, scale);
        if (fold.finish(args, r)) break;
      }
    }
  });
}

// Dense with transpose, sinkhorn_softmin only: out_j = -eps ln 2 log2 sum_i 2^(t_i - C_ij scale) with
// cost (B, M, N) read row by row (i) and the outputs j vectorised in blocks of columns. One
// pass with the shift, else (or when a sum is out of range) a maximum pass and a sum pass.
template <typename T>
void softmin_columns(const T* cost, const std::vector<T>& terms, int64_t batch, int64_t outs, int64_t sums, T eps,
                     const typename SoftminFold<T>::Args& args) {
  // Wide blocks read whole pages of each row (few TLB misses), but at least one per thread.
  constexpr int64_t kMaxBlock = 1024;
  const int64_t per_thread = (outs + at::get_num_threads() - 1) / at::get_num_threads();
  const int64_t block = std::clamp<int64_t>((per_thread + 15) / 16 * 16, 64, kMaxBlock);
  const T scale = cost_scale(eps);
  const int64_t blocks = (outs + block - 1) / block;
  at::parallel_for(0, batch * blocks, grain_for(block * sums), [&](int64_t t0, int64_t t1) {
    T m[kMaxBlock], s[kMaxBlock];
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / blocks, j0 = (task % blocks) * block;
      const int64_t len = std::min(block, outs - j0);
      const T* cost_b = cost + b * sums * outs + j0;
      const T* terms_b = terms.data() + b * sums;
      auto run = [&](bool exact) {
        if (exact) {
          std::fill(m, m + len, kNegInf<T>);
          for (int64_t i = 0; i < sums; ++i) {
            const T t = terms_b[i];
            const T* row = cost_b + i * outs;
#pragma omp simd
            for (int64_t j = 0; j < len; ++j) {
              const T u = t - row[j] * scale;
              m[j] = u > m[j] ? u : m[j];
            }
          }
        } else {
          for (int64_t j = 0; j < len; ++j) m[j] = -args.shift[b * outs + j0 + j] * static_cast<T>(kLog2e) / eps;
        }
        std::fill(s, s + len, T(0));
        for (int64_t i = 0; i < sums; ++i) {
          const T t = terms_b[i];
          const T* row = cost_b + i * outs;
#pragma omp simd
          for (int64_t j = 0; j < len; ++j) s[j] += vec_pow2<T>(t - row[j] * scale - m[j]);
        }
        if (!exact && !std::all_of(s, s + len, accepted_sum<T>)) return false;
        for (int64_t j = 0; j < len; ++j) {
          args.out[b * outs + j0 + j] = -eps * static_cast<T>(kLn2) * (m[j] + std::log2(s[j]));
        }
        return true;
      };
      if (!run(args.shift == nullptr)) run(true);
    }
  });
}

// Online mode. y comes transposed and padded, yt (B, D, cols_padded), so that a register tile of
// kCols columns is one contiguous load per d; padded columns have weight 0 (log_w = -inf). The
// dot products of a span of kSpan columns are formed tile by tile, then turned into costs and
// folded at once.
template <typename T, typename Fold>
void sweep_online(const T* x, const T* yt, const T* sq_y, const std::vector<T>& terms, int64_t batch, int64_t rows,
                  int64_t cols_padded, int64_t dim, T eps, const typename Fold::Args& args) {
  constexpr int C = kCols<T>;
  const T scale = cost_scale(eps);
  const std::vector<T> zero_row(dim, T(0));
  const int64_t row_blocks = (rows + kRows - 1) / kRows;
  at::parallel_for(0, batch * row_blocks, grain_for(kRows * cols_padded * std::max<int64_t>(dim, 1)),
                   [&](int64_t t0, int64_t t1) {
    T cost[kRows][kSpan<T>];
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / row_blocks, i0 = (task % row_blocks) * kRows;
      const int n_rows = static_cast<int>(std::min<int64_t>(kRows, rows - i0));
      const T* xr[kRows];
      T sq_x[kRows];
      for (int r = 0; r < kRows; ++r) {
        xr[r] = r < n_rows ? x + (b * rows + i0 + r) * dim : zero_row.data();
        T s = 0;
        for (int64_t d = 0; d < dim; ++d) s += xr[r][d] * xr[r][d];
        sq_x[r] = s;
      }
      const T* ytb = yt + b * dim * cols_padded;
      const T* sq_yb = sq_y + b * cols_padded;
      const T* terms_b = terms.data() + b * Fold::kColumnArrays * cols_padded;
      // The rows of this block, folded with the guessed shift first; redone exactly if a row asks.
      auto fold_block = [&](bool exact) {
        std::vector<Fold> folds;
        for (int r = 0; r < n_rows; ++r) folds.emplace_back(args, b * rows + i0 + r, exact);
        for (int64_t s0 = 0; s0 < cols_padded; s0 += kSpan<T>) {
          const int span = static_cast<int>(std::min<int64_t>(kSpan<T>, cols_padded - s0));  // a multiple of C
          for (int c0 = 0; c0 < span; c0 += C) {
            // acc[r][h]: dot products of row r with the kLanes columns s0 + c0 + h * kLanes onwards.
            Vec<T> acc[kRows][2] = {};
            const T* yd = ytb + s0 + c0;
            for (int64_t d = 0; d < dim; ++d, yd += cols_padded) {
              const Vec<T> y0 = load_vec(yd);
              const Vec<T> y1 = load_vec(yd + kLanes<T>);
#pragma GCC unroll 4
              for (int r = 0; r < kRows; ++r) {
                acc[r][0] += xr[r][d] * y0;
                acc[r][1] += xr[r][d] * y1;
              }
            }
            for (int r = 0; r < n_rows; ++r) __builtin_memcpy(cost[r] + c0, acc[r], sizeof(acc[r]));
          }
          for (int r = 0; r < n_rows; ++r) {
            T* c = cost[r];
            const T* sq = sq_yb + s0;
#pragma omp simd
            for (int j = 0; j < span; ++j) c[j] = std::max(sq_x[r] + sq[j] - T(2) * c[j], T(0));
            folds[r].add(terms_b + s0, cols_padded, c, span, scale);
          }
        }
        bool done = true;
        for (int r = 0; r < n_rows; ++r) done = folds[r].finish(args, b * rows + i0 + r) && done;
        return done;
      };
      if (!fold_block(false)) fold_block(true);
    }
  });
}

// sinkhorn_kernel (schemas.h): exp in base 2, 2^(((f_i + g_j) - C_ij) log2 e / eps), with 0 and inf
// beyond vec_pow2's range (which clamps) so that the scaling step sees the under- and overflows.
template <typename T>
void build_kernel(const KernelArgs<T>& s) {
  using Limits = Pow2Constants<T>;
  const T scale = cost_scale(s.eps);
  at::parallel_for(0, s.batch * s.rows, grain_for(s.cols), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T fi = s.f[r];
      const T* g = s.g + (r / s.rows) * s.cols;
      const T* c = s.cost + r * s.cols;
      T* out = s.kernel + r * s.cols;
#pragma omp simd
      for (int64_t j = 0; j < s.cols; ++j) {
        const T u = ((fi + g[j]) - c[j]) * scale;
        const T p = vec_pow2<T>(u);
        out[j] = u < Limits::kMin ? T(0) : (u > Limits::kMax ? std::numeric_limits<T>::infinity() : p);
      }
    }
  });
}

// sinkhorn_scaling_step (schemas.h). The rows of all problems are cut into one contiguous range per
// thread; each row's dot product with b v gives u'_i, and the row, still in cache, is added times
// a_i u'_i to the thread's own column sums (one K read per iteration). Then the threads' column
// sums are added up per column, v'_j = 1 / sum, and the extremes of u', v' give status[b, 1].
template <typename T>
void scaling_step(const ScalingArgs<T>& s) {
  const int64_t total = s.batch * s.rows, cols = s.cols;
  const int64_t chunks = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), total * cols / kMinTaskWork));
  std::vector<T> bv(s.batch * cols);  // b_j v_j
  for (int64_t k = 0; k < s.batch * cols; ++k) bv[k] = s.b[k] * s.v[k];
  std::vector<T> partial(chunks * s.batch * cols, T(0));
  struct Extremes {  // per chunk and problem: error, min / max of u', a failed u'
    T error = 0, lo = std::numeric_limits<T>::infinity(), hi = 0;
    bool bad = false;
  };
  std::vector<Extremes> extremes(chunks * s.batch);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      for (int64_t r = total * c / chunks, stop = total * (c + 1) / chunks; r < stop; ++r) {
        const int64_t b = r / s.rows;
        const T* row = s.kernel + r * cols;
        const T* w = bv.data() + b * cols;
        T sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < cols; ++j) sum += row[j] * w[j];
        const T u = T(1) / sum;
        s.u_out[r] = u;
        Extremes& e = extremes[c * s.batch + b];
        e.error += s.a[r] * std::abs(s.u[r] * sum - T(1));
        e.lo = std::min(e.lo, u);
        e.hi = std::max(e.hi, u);
        e.bad = e.bad || !(u > T(0) && u < std::numeric_limits<T>::infinity());
        const T weight = s.a[r] * u;
        if (weight == T(0)) continue;
        T* col = partial.data() + (c * s.batch + b) * cols;
#pragma omp simd
        for (int64_t j = 0; j < cols; ++j) col[j] += row[j] * weight;
      }
    }
  });
  at::parallel_for(0, s.batch * cols, grain_for(chunks), [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      T sum = 0;
      for (int64_t c = 0; c < chunks; ++c) sum += partial[c * s.batch * cols + k];
      s.v_out[k] = T(1) / sum;
    }
  });
  for (int64_t b = 0; b < s.batch; ++b) {
    T error = 0, lo = std::numeric_limits<T>::infinity(), hi = 0;
    bool bad = false;
    for (int64_t c = 0; c < chunks; ++c) {
      const Extremes& e = extremes[c * s.batch + b];
      error += e.error;
      lo = std::min(lo, e.lo);
      hi = std::max(hi, e.hi);
      bad = bad || e.bad;
    }
    const T* v = s.v_out + b * cols;
    for (int64_t j = 0; j < cols; ++j) {
      lo = std::min(lo, v[j]);
      hi = std::max(hi, v[j]);
      bad = bad || !(v[j] > T(0) && v[j] < std::numeric_limits<T>::infinity());
    }
    s.status[2 * b] = error;
    s.status[2 * b + 1] = scaling_spread(lo, hi, bad);
  }
}

// The backend of sinkhorn_softmin_op and sinkhorn_plan_sums_op (sinkhorn_common.h): sweep runs a
// Fold over all pairs, online from x and y or dense from cost.
struct CpuBackend {
  template <typename T>
  using SoftminFold = pfc_fast::PFC_CPU_ISA::SoftminFold<T>;
  template <typename T>
  using PlanFold = pfc_fast::PFC_CPU_ISA::PlanFold<T>;
  static int guard(const at::Tensor&) { return 0; }  // nothing to switch on the CPU
  template <typename T>
  static void kernel(const KernelArgs<T>& args) {
    build_kernel<T>(args);
  }
  template <typename T>
  static void scaling_step(const ScalingArgs<T>& args, const at::TensorOptions&) {
    pfc_fast::PFC_CPU_ISA::scaling_step<T>(args);
  }

  template <typename T, typename Fold>
  static void sweep(const c10::optional<at::Tensor>& x, const c10::optional<at::Tensor>& y,
                    const c10::optional<at::Tensor>& cost, const at::Tensor& h, const at::Tensor& log_w, T eps,
                    const SoftminShape& shape, const typename Fold::Args& args) {
    if (cost.has_value()) {
      const at::Tensor c = cost->contiguous();
      const auto terms = Fold::columns(h.data_ptr<T>(), log_w.data_ptr<T>(), shape.batch, shape.cols, shape.cols, eps);
      if (!shape.transpose) {
        sweep_dense<T, Fold>(c.data_ptr<T>(), terms, shape.batch, shape.rows, shape.cols, eps, args);
      } else if constexpr (std::is_same_v<Fold, SoftminFold<T>>) {
        softmin_columns<T>(c.data_ptr<T>(), terms, shape.batch, shape.rows, shape.cols, eps, args);
      } else {
        TORCH_CHECK(false, "pfc_fast: transpose applies to sinkhorn_softmin only");
      }
      return;
    }
    constexpr int C = kCols<T>;
    const int64_t padded = (shape.cols + C - 1) / C * C;
    const at::Tensor xc = x->contiguous();
    at::Tensor yt = at::zeros({shape.batch, shape.dim, padded}, h.options());
    yt.narrow(2, 0, shape.cols).copy_(y->transpose(1, 2));
    at::Tensor sq_y = at::zeros({shape.batch, padded}, h.options());
    sq_y.narrow(1, 0, shape.cols).copy_((*y * *y).sum(2));
    const auto terms = Fold::columns(h.data_ptr<T>(), log_w.data_ptr<T>(), shape.batch, shape.cols, padded, eps);
    sweep_online<T, Fold>(xc.data_ptr<T>(), yt.data_ptr<T>(), sq_y.data_ptr<T>(), terms, shape.batch, shape.rows,
                          padded, shape.dim, eps, args);
  }
};

}  // namespace

void register_sinkhorn_cpu(torch::Library& m) {
  m.impl("sinkhorn_softmin", &sinkhorn_softmin_op<CpuBackend>);
  m.impl("sinkhorn_plan_sums", &sinkhorn_plan_sums_op<CpuBackend>);
  m.impl("sinkhorn_kernel", &sinkhorn_kernel_op<CpuBackend>);
  m.impl("sinkhorn_scaling_step", &sinkhorn_scaling_step_op<CpuBackend>);
}

}  // namespace PFC_CPU_ISA
}  // namespace pfc_fast
PFC_CPU_ISA_END

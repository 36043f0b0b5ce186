// CPU kernels of the Sinkhorn ops (spec section 4; schemas in pfc_fast.cpp). Both sweep the
// pairs (i, j) once, forming
//
//   v_ij = col_j - C_ij / eps,   col_j = log_w_j + h_j / eps,
//
// and fold every row as they go, so nothing of size N x M is stored:
//   sinkhorn_softmin:    out_i = -eps * log sum_j exp(v_ij)   (running max and rescaled sum)
//   sinkhorn_plan_sums:  with P_ij = exp(v_ij + log a_i + f_i / eps) (h = g, log_w = log b),
//                        mass_i = sum_j P_ij and cost_i = sum_j P_ij C_ij.
// Online mode computes C_ij = max(|x_i|^2 + |y_j|^2 - 2 x_i.y_j, 0) in register tiles of kRows
// rows x kCols columns (the dot products over d accumulate in registers); dense mode reads rows
// of a given C. exp is the vectorisable vec_exp.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../sinkhorn_common.h"
#include "grain.h"
#include "vec_exp.h"

namespace pfc_fast {
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

// A Fold consumes the pairs of one row, a block at a time: add(terms, cost, n, inv_eps) with the
// values v_j = terms_j - cost_j * inv_eps, then finish(args, row) writes the row's result.

// Row fold of sinkhorn_softmin: a running log-sum-exp of v (maximum and rescaled sum). v is formed
// twice, for the block maximum and for the sum, rather than stored.
template <typename T>
struct SoftminFold {
  struct Args {
    T eps;
    T* out;
  };
  T max = kNegInf<T>;
  T sum = 0;

  SoftminFold(const Args&, int64_t) {}

  void add(const T* terms, const T* cost, int64_t n, T inv_eps) {
    T block_max = kNegInf<T>;
#pragma omp simd reduction(max : block_max)
    for (int64_t j = 0; j < n; ++j) {
      const T v = terms[j] - cost[j] * inv_eps;
      block_max = v > block_max ? v : block_max;
    }
    if (block_max == kNegInf<T>) return;  // zero weights only
    if (block_max > max) {
      sum = max == kNegInf<T> ? T(0) : sum * vec_exp<T, true>(max - block_max);
      max = block_max;
    }
    const T m = max;
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < n; ++j) s += vec_exp<T, true>(terms[j] - cost[j] * inv_eps - m);
    sum += s;
  }

  void finish(const Args& args, int64_t row) const { args.out[row] = -args.eps * (max + std::log(sum)); }
};

// Row fold of sinkhorn_plan_sums: mass and cost of one row of the plan P_ij = exp(v_j + row_term).
template <typename T>
struct PlanFold {
  struct Args {
    const T* row_terms;  // log a_i + f_i / eps, (B * N)
    T* mass;
    T* cost;
  };
  T row_term;
  T mass = 0;
  T cost = 0;

  PlanFold(const Args& args, int64_t row) : row_term(args.row_terms[row]) {}

  void add(const T* terms, const T* c, int64_t n, T inv_eps) {
    T m = 0, k = 0;
    const T r = row_term;
#pragma omp simd reduction(+ : m, k)
    for (int64_t j = 0; j < n; ++j) {
      const T p = terms[j] == kNegInf<T> ? T(0) : vec_exp<T>(terms[j] - c[j] * inv_eps + r);
      m += p;
      k += p * c[j];
    }
    mass += m;
    cost += k;
  }

  void finish(const Args& args, int64_t row) const {
    args.mass[row] = mass;
    args.cost[row] = cost;
  }
};

// col_j = log_w_j + h_j / eps for every problem of the batch, rows of `stride` (>= cols; the
// padding stays -inf, i.e. weight 0).
template <typename T>
std::vector<T> column_terms(const T* h, const T* log_w, int64_t batch, int64_t cols, int64_t stride, T eps) {
  std::vector<T> terms(batch * stride, kNegInf<T>);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t j = 0; j < cols; ++j) terms[b * stride + j] = log_w[b * cols + j] + h[b * cols + j] / eps;
  }
  return terms;
}

template <typename T, typename Fold>
void sweep_dense(const T* cost, const std::vector<T>& terms, int64_t batch, int64_t rows, int64_t cols, T eps,
                 const typename Fold::Args& args) {
  const T inv_eps = T(1) / eps;
  at::parallel_for(0, batch * rows, grain_for(cols), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      Fold fold(args, r);
      fold.add(terms.data() + (r / rows) * cols, cost + r * cols, cols, inv_eps);
      fold.finish(args, r);
    }
  });
}

// Online mode. y comes transposed and padded, yt (B, D, cols_padded), so that a register tile of
// kCols columns is one contiguous load per d; padded columns have col_j = -inf (weight 0). The
// dot products of a span of kSpan columns are formed tile by tile, then turned into costs and
// folded at once.
template <typename T, typename Fold>
void sweep_online(const T* x, const T* yt, const T* sq_y, const std::vector<T>& terms, int64_t batch, int64_t rows,
                  int64_t cols_padded, int64_t dim, T eps, const typename Fold::Args& args) {
  constexpr int C = kCols<T>;
  const T inv_eps = T(1) / eps;
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
      const T* terms_b = terms.data() + b * cols_padded;
      std::vector<Fold> folds;
      for (int r = 0; r < n_rows; ++r) folds.emplace_back(args, b * rows + i0 + r);
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
          folds[r].add(terms_b + s0, c, span, inv_eps);
        }
      }
      for (int r = 0; r < n_rows; ++r) folds[r].finish(args, b * rows + i0 + r);
    }
  });
}

// The backend of sinkhorn_softmin_op and sinkhorn_plan_sums_op (sinkhorn_common.h): sweep runs a
// Fold over all pairs, online from x and y or dense from cost.
struct CpuBackend {
  template <typename T>
  using SoftminFold = pfc_fast::SoftminFold<T>;
  template <typename T>
  using PlanFold = pfc_fast::PlanFold<T>;
  static int guard(const at::Tensor&) { return 0; }  // nothing to switch on the CPU

  template <typename T, typename Fold>
  static void sweep(const c10::optional<at::Tensor>& x, const c10::optional<at::Tensor>& y,
                    const c10::optional<at::Tensor>& cost, const at::Tensor& h, const at::Tensor& log_w, T eps,
                    const SoftminShape& shape, const typename Fold::Args& args) {
    if (cost.has_value()) {
      const at::Tensor c = cost->contiguous();
      const auto terms = column_terms<T>(h.data_ptr<T>(), log_w.data_ptr<T>(), shape.batch, shape.cols, shape.cols, eps);
      sweep_dense<T, Fold>(c.data_ptr<T>(), terms, shape.batch, shape.rows, shape.cols, eps, args);
      return;
    }
    constexpr int C = kCols<T>;
    const int64_t padded = (shape.cols + C - 1) / C * C;
    const at::Tensor xc = x->contiguous();
    at::Tensor yt = at::zeros({shape.batch, shape.dim, padded}, h.options());
    yt.narrow(2, 0, shape.cols).copy_(y->transpose(1, 2));
    at::Tensor sq_y = at::zeros({shape.batch, padded}, h.options());
    sq_y.narrow(1, 0, shape.cols).copy_((*y * *y).sum(2));
    const auto terms = column_terms<T>(h.data_ptr<T>(), log_w.data_ptr<T>(), shape.batch, shape.cols, padded, eps);
    sweep_online<T, Fold>(xc.data_ptr<T>(), yt.data_ptr<T>(), sq_y.data_ptr<T>(), terms, shape.batch, shape.rows,
                          padded, shape.dim, eps, args);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(pfc_fast, CPU, m) {
  m.impl("sinkhorn_softmin", &sinkhorn_softmin_op<CpuBackend>);
  m.impl("sinkhorn_plan_sums", &sinkhorn_plan_sums_op<CpuBackend>);
}

}  // namespace pfc_fast

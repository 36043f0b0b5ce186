// CPU kernels of the two passes of the exact NC metrics (docs/spec.md section 3), vectorised with
// `omp simd` and parallelised with at::parallel_for (so torch.set_num_threads applies).
//
// Pass 1, class_sums:   sums[l, c] = sum_{y_li = c} h_i  (float64; L labellings y_l, each row read once)
// Pass 2, residual_stats, with r_i = h_i - mu_{y_i} in float64, t_i = basis r_i and the class
// scores s_i = mean_coords t_i (= M r_i):
//   basis_sq[j] = sum_i t_i[j]^2,  class_sq[c] = sum_{y_i = c} ||r_i||^2, and the NCC decisions
//   argmin_c ||h_i - mu_c||^2 = argmin_c (||mu_{y_i} - mu_c||^2 - 2 (mu_c - mu_G) . r_i)
//   (the terms ||r_i||^2 and (mu_{y_i} - mu_G) . r_i do not depend on c).
// Each pass reads every feature once; residuals are formed tile by tile and never stored whole. From
// kProductClasses classes on, the host side (nc_common.h) projects by BLAS products instead and leaves
// only the decisions to sample_decisions below.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <mutex>
#include <vector>

#include "nc/nc_common.h"
#include "common/grain.h"

#include "common/cpu_isa.h"

PFC_CPU_ISA_BEGIN
namespace pfc_fast {
namespace PFC_CPU_ISA {
namespace {

constexpr int64_t kColumnBlock = 256;          // columns one task of pass 1 owns
constexpr int64_t kPartialBytes = 256 << 20;   // bound on pass-1 per-chunk partial sums
constexpr int64_t kRowBlock = 8;               // samples that share a cached tile of proj
constexpr int64_t kTile = 512;                 // feature columns per residual tile
static_assert(kFusedBasisMax <= kTile, "the fused kernel's basis coordinates fit a tile row");

// Pass 1. Work is split into (row chunk, column block) tasks. With enough column blocks every
// task writes straight into `sums` (each task owns its columns); with few columns (small D) the
// rows are split as well and each row chunk accumulates into its own partial copy. A row's
// block of columns, read once, is added to the sums of each of the L labellings.
template <typename scalar_t>
void class_sums_kernel(const scalar_t* x, int64_t row_stride, const ClassSumsArgs& args) {
  const int64_t N = args.N, D = args.D, K = args.L * args.K, L = args.L;  // K: rows of sums, all labellings
  const int64_t* labels = args.labels;
  double* sums = args.sums;
  const int64_t col_blocks = (D + kColumnBlock - 1) / kColumnBlock;
  const int64_t threads = at::get_num_threads();
  int64_t row_chunks = 1;
  if (col_blocks < 2 * threads) {
    const int64_t by_memory = std::max<int64_t>(1, kPartialBytes / (K * D * 8));
    row_chunks = std::min({(2 * threads + col_blocks - 1) / col_blocks, std::max<int64_t>(1, N / 1024),
                           by_memory});
  }
  std::vector<double> partial(row_chunks > 1 ? row_chunks * K * D : 0, 0.0);
  const int64_t rows_per_chunk = (N + row_chunks - 1) / row_chunks;

  at::parallel_for(0, row_chunks * col_blocks, grain_for(rows_per_chunk * kColumnBlock), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t chunk = t / col_blocks;
      const int64_t d0 = (t % col_blocks) * kColumnBlock;
      const int64_t len = std::min(kColumnBlock, D - d0);
      double* out = row_chunks > 1 ? partial.data() + chunk * K * D : sums;
      const int64_t i1 = std::min(N, (chunk + 1) * rows_per_chunk);
      for (int64_t i = chunk * rows_per_chunk; i < i1; ++i) {
        const scalar_t* xr = x + i * row_stride + d0;
        for (int64_t l = 0; l < L; ++l) {
          double* acc = out + (l * args.K + labels[l * N + i]) * D + d0;
#pragma omp simd
          for (int64_t j = 0; j < len; ++j) acc[j] += as_double(xr[j]);
        }
      }
    }
  });
  if (row_chunks > 1) {
    at::parallel_for(0, K * D, grain_for(row_chunks), [&](int64_t e0, int64_t e1) {
      for (int64_t chunk = 0; chunk < row_chunks; ++chunk) {
        const double* p = partial.data() + chunk * K * D;
#pragma omp simd
        for (int64_t e = e0; e < e1; ++e) sums[e] += p[e];
      }
    });
  }
}

// S[r * P + k] += proj[k * ld, :len] . R[r * kTile, :len] for the k < P rows of proj and the
// given rows of R: four rows of proj at a time, with one accumulator each, then the rest.
inline void project_tile(const double* R, int64_t rows, const double* proj, int64_t P, int64_t ld,
                         int64_t len, double* S) {
  int64_t k = 0;
  for (; k + 4 <= P; k += 4) {
    const double* p0 = proj + k * ld;
    const double* p1 = p0 + ld;
    const double* p2 = p1 + ld;
    const double* p3 = p2 + ld;
    for (int64_t r = 0; r < rows; ++r) {
      const double* v = R + r * kTile;
      double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int64_t j = 0; j < len; ++j) {
        s0 += p0[j] * v[j];
        s1 += p1[j] * v[j];
        s2 += p2[j] * v[j];
        s3 += p3[j] * v[j];
      }
      double* out = S + r * P + k;
      out[0] += s0;
      out[1] += s1;
      out[2] += s2;
      out[3] += s3;
    }
  }
  for (; k < P; ++k) {
    const double* p = proj + k * ld;
    for (int64_t r = 0; r < rows; ++r) {
      const double* v = R + r * kTile;
      double s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < len; ++j) s += p[j] * v[j];
      S[r * P + k] += s;
    }
  }
}

// Pass 2 over blocks of kRowBlock samples; every thread keeps its own accumulators.
template <typename scalar_t>
void residual_stats_kernel(const scalar_t* x, int64_t row_stride, const ResidualInputs& in,
                           const ResidualOutputs& out) {
  double* const basis_sq_out = out.basis_sq.data_ptr<double>();
  double* const class_sq_out = out.class_sq.data_ptr<double>();
  int64_t* const decisions_out = out.decisions.data_ptr<int64_t>();
  const int64_t K = in.K, D = in.D, B = in.num_basis, P = in.num_basis + in.num_logits;
  const int64_t blocks = (in.N + kRowBlock - 1) / kRowBlock;
  std::mutex merge;
  at::parallel_for(0, blocks, grain_for(kRowBlock * (D * (P + 1) + K * B)), [&](int64_t b0, int64_t b1) {
    std::vector<double> R(kRowBlock * kTile), S(kRowBlock * P), rr(kRowBlock), scores(kRowBlock * K);
    std::vector<double> basis_sq(B, 0.0), class_sq(K, 0.0);
    int64_t correct = 0, disagree = 0;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i0 = b * kRowBlock;
      const int64_t rows = std::min(kRowBlock, in.N - i0);
      std::fill(S.begin(), S.end(), 0.0);
      std::fill(rr.begin(), rr.end(), 0.0);
      for (int64_t d0 = 0; d0 < D; d0 += kTile) {
        const int64_t len = std::min(kTile, D - d0);
        for (int64_t r = 0; r < rows; ++r) {
          const scalar_t* xr = x + (i0 + r) * row_stride + d0;
          const double* mu = in.means + in.labels[i0 + r] * D + d0;
          double* v = R.data() + r * kTile;
          double sq = 0;
#pragma omp simd reduction(+ : sq)
          for (int64_t j = 0; j < len; ++j) {
            v[j] = as_double(xr[j]) - mu[j];
            sq += v[j] * v[j];
          }
          rr[r] += sq;
        }
        project_tile(R.data(), rows, in.proj + d0, P, D, len, S.data());
      }
      // The class scores of the block: its basis coordinates (moved to R) times mean_coords.
      std::fill(scores.begin(), scores.end(), 0.0);
      for (int64_t r = 0; r < rows; ++r) std::copy(S.data() + r * P, S.data() + r * P + B, R.data() + r * kTile);
      project_tile(R.data(), rows, in.mean_coords, K, B, B, scores.data());
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = i0 + r, y = in.labels[i];
        const double* t = S.data() + r * P;
#pragma omp simd
        for (int64_t j = 0; j < B; ++j) basis_sq[j] += t[j] * t[j];
        class_sq[y] += rr[r];
        const SampleDecisions decision = decide(scores.data() + r * K, t + B, rr[r], x + i * row_stride, i, y, in);
        correct += decision.correct;
        disagree += decision.disagrees;
      }
    }
    std::lock_guard<std::mutex> lock(merge);
    for (int64_t j = 0; j < B; ++j) basis_sq_out[j] += basis_sq[j];
    for (int64_t c = 0; c < K; ++c) class_sq_out[c] += class_sq[c];
    decisions_out[0] += correct;
    decisions_out[1] += disagree;
  });
}

// The backend of class_sums_op and residual_stats_op (nc_common.h).
struct CpuBackend {
  static int guard(const at::Tensor&) { return 0; }  // nothing to switch on the CPU

  template <typename scalar_t>
  static void class_sums(const at::Tensor& feats, const ClassSumsArgs& args) {
    class_sums_kernel<scalar_t>(feats.data_ptr<scalar_t>(), feats.stride(0), args);
  }

  template <typename scalar_t>
  static void residual_stats(const at::Tensor& feats, const ResidualTensors&, const ResidualInputs& in,
                             const ResidualOutputs& out) {
    residual_stats_kernel<scalar_t>(feats.data_ptr<scalar_t>(), feats.stride(0), in, out);
  }

  // The decisions of the samples start .. start + rows - 1 from their class scores (rows, K), their
  // projections (rows, P) and ||r||^2.
  template <typename scalar_t>
  static void sample_decisions(const at::Tensor& scores, const at::Tensor& products, const at::Tensor& r_sq,
                               const at::Tensor& feats, const ResidualInputs& in, int64_t start,
                               const at::Tensor& decisions) {
    const scalar_t* x = feats.data_ptr<scalar_t>();
    const int64_t row_stride = feats.stride(0), P = products.size(1), K = in.K;
    const double* s = scores.data_ptr<double>();
    const double* logits = products.data_ptr<double>() + in.num_basis;
    const double* sq = r_sq.data_ptr<double>();
    std::atomic<int64_t> correct{0}, disagree{0};
    at::parallel_for(0, scores.size(0), grain_for(K + in.num_logits), [&](int64_t r0, int64_t r1) {
      int64_t c = 0, d = 0;
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t i = start + r;
        const SampleDecisions decision =
            decide(s + r * K, logits + r * P, sq[r], x + i * row_stride, i, in.labels[i], in);
        c += decision.correct;
        d += decision.disagrees;
      }
      correct += c;
      disagree += d;
    });
    decisions[0] += correct.load();
    decisions[1] += disagree.load();
  }
};

}  // namespace

void register_nc_cpu(torch::Library& m) {
  m.impl("class_sums", &class_sums_op<CpuBackend>);
  m.impl("residual_stats", &residual_stats_op<CpuBackend>);
}

}  // namespace PFC_CPU_ISA
}  // namespace pfc_fast
PFC_CPU_ISA_END

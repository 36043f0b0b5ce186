// What the CPU and CUDA kernels of the NC passes share (schemas in schemas.h): argument checks,
// the kernels' operands, the per-sample decision rules, and the host side of the two ops, which
// hand the operands to the backend's kernels.
// The Python front door validates user input with clearer messages; these checks guard the ops
// themselves against calls that would read out of bounds.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <utility>
#include <vector>

#include "common/device.h"

namespace pfc_fast {

inline void check_same_device(const at::Tensor& feats, const at::Tensor& other, const char* name) {
  TORCH_CHECK(other.device() == feats.device(), "pfc_fast: ", name, " is on ", other.device(),
              " but feats is on ", feats.device());
}

// labellings: labels may also be (L, N), L >= 1 labellings of the samples (class_sums).
inline void check_feats_labels(const at::Tensor& feats, const at::Tensor& labels, bool labellings = false) {
  TORCH_CHECK(feats.dim() == 2, "pfc_fast: feats must be 2-D (N, D), got ", feats.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(feats.scalar_type()), "pfc_fast: feats must be floating point, got ",
              feats.scalar_type());
  const bool stacked = labellings && labels.dim() == 2 && labels.size(0) >= 1;
  TORCH_CHECK((labels.dim() == 1 || stacked) && labels.size(-1) == feats.size(0), "pfc_fast: labels must have shape (N,)",
              labellings ? " or (L, N)" : "", " with N = ", feats.size(0), ", got ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, "pfc_fast: labels must be int64, got ",
              labels.scalar_type());
  check_same_device(feats, labels, "labels");
}

inline void check_float64_matrix(const at::Tensor& feats, const at::Tensor& t, const char* name,
                                 int64_t rows, int64_t cols) {
  TORCH_CHECK(t.scalar_type() == at::kDouble, "pfc_fast: ", name, " must be float64");
  TORCH_CHECK(t.dim() == 2 && (rows < 0 || t.size(0) == rows) && t.size(1) == cols, "pfc_fast: ",
              name, " has shape ", t.sizes(), ", expected (", rows, ", ", cols, ")");
  check_same_device(feats, t, name);
}

// The shape of residual_stats' operands: K classes, the rows of proj (P = num_basis + num_logits).
struct ResidualShape {
  int64_t K, num_basis, num_logits;
};

// Checks the arguments of residual_stats and returns their shape.
inline ResidualShape check_residual_args(
    const at::Tensor& feats, const at::Tensor& labels, const at::Tensor& means, const at::Tensor& proj,
    const at::Tensor& mean_coords, const at::Tensor& ncc_bias, double score_error,
    const c10::optional<at::Tensor>& logit_offset, const c10::optional<at::Tensor>& predictions) {
  check_feats_labels(feats, labels);
  const int64_t D = feats.size(1);
  check_float64_matrix(feats, means, "means", -1, D);
  const int64_t K = means.size(0);
  TORCH_CHECK(K >= 1, "pfc_fast: means must have at least one row");
  check_float64_matrix(feats, ncc_bias, "ncc_bias", K, K);
  TORCH_CHECK(mean_coords.dim() == 2, "pfc_fast: mean_coords must be 2-D (K, B)");
  const int64_t num_basis = mean_coords.size(1);
  check_float64_matrix(feats, mean_coords, "mean_coords", K, num_basis);
  TORCH_CHECK(std::isfinite(score_error) && score_error >= 0.0, "pfc_fast: score_error must be finite and >= 0, got ",
              score_error);
  int64_t num_logits = 0;
  if (logit_offset.has_value()) {
    TORCH_CHECK(logit_offset->dim() == 2, "pfc_fast: logit_offset must be 2-D (K, K_w)");
    num_logits = logit_offset->size(1);
    TORCH_CHECK(num_logits >= 1, "pfc_fast: logit_offset needs at least one column");
    check_float64_matrix(feats, *logit_offset, "logit_offset", K, num_logits);
  }
  check_float64_matrix(feats, proj, "proj", num_basis + num_logits, D);
  if (predictions.has_value()) {
    TORCH_CHECK(predictions->dim() == 1 && predictions->size(0) == feats.size(0) &&
                    predictions->scalar_type() == at::kLong,
                "pfc_fast: predictions must be int64 of shape (N,)");
    check_same_device(feats, *predictions, "predictions");
  }
  return {K, num_basis, num_logits};
}

// The kernels read rows with an arbitrary row stride but contiguous columns.
inline at::Tensor with_contiguous_rows(const at::Tensor& feats) {
  return (feats.size(1) <= 1 || feats.stride(1) == 1) ? feats : feats.contiguous();
}

// Number of samples of each class, (num_classes,) int64, or (L, num_classes) for labels (L, N);
// rejects labels outside [0, num_classes).
inline at::Tensor class_counts(const at::Tensor& labels, int64_t num_classes) {
  TORCH_CHECK(num_classes >= 1, "pfc_fast: num_classes must be positive, got ", num_classes);
  const int64_t L = labels.dim() == 2 ? labels.size(0) : 1;
  const auto shape = labels.dim() == 2 ? std::vector<int64_t>{L, num_classes} : std::vector<int64_t>{num_classes};
  if (labels.numel() == 0) return at::zeros(shape, labels.options());
  TORCH_CHECK(labels.min().item<int64_t>() >= 0, "pfc_fast: labels must be >= 0");
  TORCH_CHECK(labels.max().item<int64_t>() < num_classes, "pfc_fast: labels must be < num_classes = ", num_classes);
  if (L == 1) return at::bincount(labels.reshape({-1}), {}, num_classes).reshape(shape);
  const at::Tensor offsets = at::arange(L, labels.options()).mul_(num_classes).unsqueeze(1);
  return at::bincount((labels + offsets).reshape({-1}), {}, L * num_classes).reshape(shape);
}

// Features as the kernels accumulate them: float64, half and bfloat16 widened through float.
template <typename scalar_t>
PFC_HOST_DEVICE inline double as_double(scalar_t v) {
  return static_cast<double>(static_cast<float>(v));
}
template <>
PFC_HOST_DEVICE inline double as_double<double>(double v) {
  return v;
}

// The operands of class_sums beside the features (N, D), whose rows the kernels read with a stride.
struct ClassSumsArgs {
  const int64_t* labels;  // (L, N): L labellings of the samples (L = 1: one)
  int64_t N, D, K, L;
  double* sums;  // (L, K, D), zeroed
};

// The operands of residual_stats beside the features.
struct ResidualInputs {
  const int64_t* labels;
  int64_t N, D, K, num_basis, num_logits;
  const double* means;         // (K, D)
  const double* proj;          // (P, D), P = num_basis + num_logits: the basis, then the classifier's rows
  const double* mean_coords;   // (K, num_basis): the centred means in the basis
  const double* ncc_bias;      // (K, K)
  double score_error;          // bound on |scores_c - m_c . r| / ||r|| (schemas.h)
  const double* logit_offset;  // (K, num_logits) or nullptr
  const int64_t* predictions;  // (N,) or nullptr
};

// The results of residual_stats, zeroed, for the backend to add to (as tensors: the host side adds
// to them with tensor ops).
struct ResidualOutputs {
  at::Tensor basis_sq;   // (num_basis,) float64
  at::Tensor class_sq;   // (K,) float64
  at::Tensor decisions;  // (2,) int64: NCC decisions equal to the label, NCC decisions != the classifier's
};

// The decision rules of ncc_accuracy and nc4 (docs/spec.md section 3), one for every device: ties
// go to the lowest index, a NaN never wins, and with no value below +inf (above -inf) index 0 does.

// Squared distance ||h - mu_c||^2 of the features h (D values) to the class mean mu_c, term by term.
template <typename scalar_t>
PFC_HOST_DEVICE inline double direct_distance(const scalar_t* h, const double* mu, int64_t D) {
  double sum = 0.0;
  for (int64_t j = 0; j < D; ++j) {
    const double v = as_double(h[j]) - mu[j];
    sum += v * v;
  }
  return sum;
}

// Index of the nearest class mean of one sample h (label y) with ||r||^2 = r_sq, given its scores
// s_c (= m_c . r up to in.score_error ||r||) and the row ncc_bias[y]. The expanded values
// v_c = ||mu_y - mu_c||^2 - 2 s_c (= ||h - mu_c||^2 less a constant, up to rounding) decide, unless
// another class is within their error of the smallest: then the squared distances of those
// candidates, computed term by term, decide. The error of v_c: 2 score_error ||r|| from the score,
// and (D + 4) eps of the offset (which the host computes from D-term sums).
template <typename scalar_t>
PFC_HOST_DEVICE inline int64_t nearest_class(const double* s, double r_sq, const scalar_t* h, int64_t y,
                                             const ResidualInputs& in) {
  constexpr double kEps = 2.220446049250313e-16;
  const double* bias_row = in.ncc_bias + y * in.K;
  const double relative = (static_cast<double>(in.D) + 4.0) * kEps;
  const double absolute = 2.0 * in.score_error * sqrt(r_sq);
  int64_t best = 0;
  double best_value = INFINITY, best_low = INFINITY, best_high = INFINITY;
  double others_low = INFINITY;  // min over the other classes of v_c - err_c
  for (int64_t c = 0; c < in.K; ++c) {
    const double v = bias_row[c] - 2.0 * s[c];
    const double err = absolute + relative * bias_row[c];
    if (v < best_value) {
      if (best_low < others_low) others_low = best_low;  // comparisons, not fmin: a NaN never counts
      best_value = v;
      best_low = v - err;
      best_high = v + err;
      best = c;
    } else if (v - err < others_low) {
      others_low = v - err;
    }
  }
  if (!(others_low <= best_high)) return best;  // uncontested (or nothing finite to contest)
  int64_t nearest = best;
  double nearest_distance = INFINITY;
  for (int64_t c = 0; c < in.K; ++c) {
    const double v = bias_row[c] - 2.0 * s[c];
    if (v - (absolute + relative * bias_row[c]) <= best_high) {
      const double distance = direct_distance(h, in.means + c * in.D, in.D);
      if (distance < nearest_distance) {
        nearest_distance = distance;
        nearest = c;
      }
    }
  }
  return nearest;
}

// Index of the classifier's largest logit, given the n logit projections and the row
// logit_offset[y] of the sample's class.
PFC_HOST_DEVICE inline int64_t argmax_logit(const double* s_logits, const double* offset_row, int64_t n) {
  int64_t best = 0;
  double best_value = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    const double v = s_logits[j] + offset_row[j];
    if (v > best_value) {
      best_value = v;
      best = j;
    }
  }
  return best;
}

struct SampleDecisions {
  bool correct;    // the nearest class mean is the label's
  bool disagrees;  // the nearest class mean is not the classifier's (argmax of the logits, or the prediction)
};

// The decisions of sample i (features h, label y in [0, K)) from its class scores, its logit
// projections (proj rows num_basis.., with logit_offset) and r_sq = ||r_i||^2.
template <typename scalar_t>
PFC_HOST_DEVICE inline SampleDecisions decide(const double* scores, const double* logits, double r_sq,
                                              const scalar_t* h, int64_t i, int64_t y, const ResidualInputs& in) {
  const int64_t ncc = nearest_class(scores, r_sq, h, y, in);
  bool disagrees = false;
  if (in.logit_offset != nullptr) {
    disagrees = ncc != argmax_logit(logits, in.logit_offset + y * in.num_logits, in.num_logits);
  } else if (in.predictions != nullptr) {
    disagrees = ncc != in.predictions[i];
  }
  return {ncc == y, disagrees};
}

// From this many classes on, the second pass projects each chunk of samples with BLAS products
// (at::mm: MKL or OpenBLAS on the CPU, cuBLAS on a GPU), the chunk's residuals formed in float64 by
// tensor ops, rather than with the backend's fused kernel, which forms each residual tile in
// registers or cache and projects it row by row. Measured on 2 CPU threads (N = 20,000): the fused
// kernel is faster up to K = 300 at every D, BLAS at K = 1,000 for D <= 256 (and even at D = 512).
constexpr int64_t kProductClasses = 512;
constexpr int64_t kFusedBasisMax = 512;  // and so do more than this many basis rows (the CPU kernel's tile)
constexpr int64_t kChunkBytes = int64_t{64} << 20;  // bound on one chunk's float64 residuals and projections

// The host side's tensors of the second pass.
struct ResidualTensors {
  at::Tensor labels, means, proj, mean_coords;
};

// What the samples start .. start + rows - 1 add to the outputs, given their projections products
// (rows, P) = [proj r_i] and r_sq (rows,) = [||r_i||^2]: the class scores (a product with
// mean_coords), the decisions (the backend's kernel), class_sq and basis_sq.
template <typename Backend, typename scalar_t>
void add_chunk(const at::Tensor& products, const at::Tensor& r_sq, const at::Tensor& feats, const ResidualTensors& t,
               const ResidualInputs& in, int64_t start, const ResidualOutputs& out) {
  const at::Tensor coords = products.narrow(1, 0, in.num_basis);
  Backend::template sample_decisions<scalar_t>(at::mm(coords, t.mean_coords.t()), products, r_sq, feats, in, start,
                                               out.decisions);
  out.class_sq.index_add_(0, t.labels.narrow(0, start, products.size(0)), r_sq);
  out.basis_sq.add_(coords.square().sum(0));
}

// The second pass by BLAS products, chunk by chunk (kProductClasses).
template <typename Backend, typename scalar_t>
void residual_stats_by_products(const at::Tensor& feats, const ResidualTensors& t, const ResidualInputs& in,
                                const ResidualOutputs& out) {
  const int64_t chunk =
      std::min(in.N, std::max<int64_t>(256, kChunkBytes / (8 * (in.D + t.proj.size(0) + in.K))));
  const at::Tensor proj_t = t.proj.t();
  for (int64_t start = 0; start < in.N; start += chunk) {
    const int64_t rows = std::min(chunk, in.N - start);
    const at::Tensor residuals = at::sub(feats.narrow(0, start, rows).to(at::kDouble),
                                         t.means.index_select(0, t.labels.narrow(0, start, rows)));
    add_chunk<Backend, scalar_t>(at::mm(residuals, proj_t), residuals.square().sum(1), feats, t, in, start, out);
  }
}

// The ops for a Backend providing
//   template <typename scalar_t> static void class_sums(feats, const ClassSumsArgs&)    (N, D > 0)
//   template <typename scalar_t> static void residual_stats(feats, const ResidualTensors&,
//       const ResidualInputs&, const ResidualOutputs&)             (N > 0; the fused kernel)
//   template <typename scalar_t> static void sample_decisions(scores, products, r_sq, feats,
//       const ResidualInputs&, int64_t start, at::Tensor decisions)
//       (adds the decisions of samples start .. start + rows - 1, see add_chunk)
//   static auto guard(const at::Tensor&)                           (a device guard, or nothing)
// with feats (N, D) of dtype scalar_t (rows with a stride, contiguous columns).
template <typename Backend>
std::tuple<at::Tensor, at::Tensor> class_sums_op(const at::Tensor& feats_in, const at::Tensor& labels_in,
                                                 int64_t num_classes) {
  check_feats_labels(feats_in, labels_in, /*labellings=*/true);
  [[maybe_unused]] const auto guard = Backend::guard(feats_in);
  const at::Tensor feats = with_contiguous_rows(feats_in);
  const at::Tensor labels = labels_in.contiguous();
  const int64_t L = labels.dim() == 2 ? labels.size(0) : 1;
  at::Tensor counts = class_counts(labels, num_classes);
  at::Tensor sums = at::zeros(labels.dim() == 2 ? std::vector<int64_t>{L, num_classes, feats.size(1)}
                                                : std::vector<int64_t>{num_classes, feats.size(1)},
                              feats.options().dtype(at::kDouble));
  if (feats.numel() == 0) return {sums, counts};  // nothing to launch (an empty CUDA grid fails)
  const ClassSumsArgs args{labels.data_ptr<int64_t>(), feats.size(0), feats.size(1), num_classes, L,
                           sums.data_ptr<double>()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(), "class_sums", [&] {
    Backend::template class_sums<scalar_t>(feats, args);
  });
  return {sums, counts};
}

template <typename Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> residual_stats_op(
    const at::Tensor& feats_in, const at::Tensor& labels_in, const at::Tensor& means_in, const at::Tensor& proj_in,
    const at::Tensor& mean_coords_in, const at::Tensor& ncc_bias_in, double score_error,
    const c10::optional<at::Tensor>& logit_offset_in, const c10::optional<at::Tensor>& predictions_in) {
  const auto [K, num_basis, num_logits] = check_residual_args(
      feats_in, labels_in, means_in, proj_in, mean_coords_in, ncc_bias_in, score_error, logit_offset_in, predictions_in);
  [[maybe_unused]] const auto guard = Backend::guard(feats_in);
  const at::Tensor feats = with_contiguous_rows(feats_in);
  const ResidualTensors t{labels_in.contiguous(), means_in.contiguous(), proj_in.contiguous(),
                          mean_coords_in.contiguous()};
  class_counts(t.labels, K);  // validates the label range before any indexing
  const at::Tensor ncc_bias = ncc_bias_in.contiguous();
  const at::Tensor logit_offset = logit_offset_in.has_value() ? logit_offset_in->contiguous() : at::Tensor();
  const at::Tensor predictions = predictions_in.has_value() ? predictions_in->contiguous() : at::Tensor();

  const auto f64 = feats.options().dtype(at::kDouble);
  const ResidualOutputs out{at::zeros({num_basis}, f64), at::zeros({K}, f64),
                            at::zeros({2}, feats.options().dtype(at::kLong))};
  if (feats.size(0) == 0) return {out.basis_sq, out.class_sq, out.decisions};
  const ResidualInputs in{t.labels.data_ptr<int64_t>(),
                          feats.size(0),
                          feats.size(1),
                          K,
                          num_basis,
                          num_logits,
                          t.means.data_ptr<double>(),
                          t.proj.data_ptr<double>(),
                          t.mean_coords.data_ptr<double>(),
                          ncc_bias.data_ptr<double>(),
                          score_error,
                          logit_offset.defined() ? logit_offset.data_ptr<double>() : nullptr,
                          predictions.defined() ? predictions.data_ptr<int64_t>() : nullptr};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(), "residual_stats", [&] {
    if (K >= kProductClasses || num_basis > kFusedBasisMax) {
      residual_stats_by_products<Backend, scalar_t>(feats, t, in, out);
    } else {
      Backend::template residual_stats<scalar_t>(feats, t, in, out);
    }
  });
  return {out.basis_sq, out.class_sq, out.decisions};
}

}  // namespace pfc_fast

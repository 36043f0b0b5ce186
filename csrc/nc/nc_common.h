// What the CPU and CUDA kernels of the NC passes share (schemas in schemas.h): argument checks
// and the class counts.
// The Python front door validates user input with clearer messages; these checks guard the ops
// themselves against calls that would read out of bounds.
#pragma once
#include <ATen/ATen.h>

namespace pfc_fast {

inline void check_same_device(const at::Tensor& feats, const at::Tensor& other, const char* name) {
  TORCH_CHECK(other.device() == feats.device(), "pfc_fast: ", name, " is on ", other.device(),
              " but feats is on ", feats.device());
}

inline void check_feats_labels(const at::Tensor& feats, const at::Tensor& labels) {
  TORCH_CHECK(feats.dim() == 2, "pfc_fast: feats must be 2-D (N, D), got ", feats.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(feats.scalar_type()), "pfc_fast: feats must be floating point, got ",
              feats.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == feats.size(0),
              "pfc_fast: labels must have shape (N,) = (", feats.size(0), ",), got ", labels.sizes());
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

// Checks the arguments of residual_stats and returns (K, number of classifier rows).
inline std::pair<int64_t, int64_t> check_residual_args(
    const at::Tensor& feats, const at::Tensor& labels, const at::Tensor& means,
    const at::Tensor& proj, const at::Tensor& ncc_bias,
    const c10::optional<at::Tensor>& logit_offset, const c10::optional<at::Tensor>& predictions) {
  check_feats_labels(feats, labels);
  const int64_t D = feats.size(1);
  check_float64_matrix(feats, means, "means", -1, D);
  const int64_t K = means.size(0);
  TORCH_CHECK(K >= 1, "pfc_fast: means must have at least one row");
  check_float64_matrix(feats, ncc_bias, "ncc_bias", K, K);
  int64_t num_logits = 0;
  if (logit_offset.has_value()) {
    TORCH_CHECK(logit_offset->dim() == 2, "pfc_fast: logit_offset must be 2-D (K, K_w)");
    num_logits = logit_offset->size(1);
    TORCH_CHECK(num_logits >= 1, "pfc_fast: logit_offset needs at least one column");
    check_float64_matrix(feats, *logit_offset, "logit_offset", K, num_logits);
  }
  check_float64_matrix(feats, proj, "proj", K + num_logits, D);
  if (predictions.has_value()) {
    TORCH_CHECK(predictions->dim() == 1 && predictions->size(0) == feats.size(0) &&
                    predictions->scalar_type() == at::kLong,
                "pfc_fast: predictions must be int64 of shape (N,)");
    check_same_device(feats, *predictions, "predictions");
  }
  return {K, num_logits};
}

// The kernels read rows with an arbitrary row stride but contiguous columns.
inline at::Tensor with_contiguous_rows(const at::Tensor& feats) {
  return (feats.size(1) <= 1 || feats.stride(1) == 1) ? feats : feats.contiguous();
}

// Number of samples of each class, (num_classes,) int64; rejects labels outside [0, num_classes).
inline at::Tensor class_counts(const at::Tensor& labels, int64_t num_classes) {
  TORCH_CHECK(num_classes >= 1, "pfc_fast: num_classes must be positive, got ", num_classes);
  if (labels.numel() == 0) return at::zeros({num_classes}, labels.options());
  at::Tensor counts = at::bincount(labels, {}, num_classes);  // raises on negative labels
  TORCH_CHECK(counts.size(0) == num_classes, "pfc_fast: labels must be < num_classes = ", num_classes);
  return counts;
}

}  // namespace pfc_fast

// The schemas of pfc_fast's operators, each with its formula. Registered once for the namespace
// pfc_fast (csrc/pfc_fast.cpp: CPU and CUDA kernels) and, with the same text, for pfc_fast_simt
// (csrc/simt/module.cpp: the CUDA kernels run on CPU tensors by the SIMT layer).
#pragma once
#include <torch/library.h>

namespace pfc_fast {

inline void define_ops(torch::Library& m) {
  // First pass of the exact NC metrics (docs/spec.md section 3): per-class feature sums in float64 and
  // class counts. feats (N, D) floating, labels (N,) int64 in [0, num_classes):
  //   sums[c] = sum_{labels[i] = c} h_i  (K, D),   counts[c] = #{i : labels[i] = c}  (K,).
  // labels (L, N): L labellings of the same samples at once (the permutation null, docs/spec.md
  // section 2), every feature read once: sums[l, c] = sum_{labels[l, i] = c} h_i  (L, K, D), counts (L, K).
  m.def("class_sums(Tensor feats, Tensor labels, int num_classes) -> (Tensor sums, Tensor counts)");
  // Second pass (docs/spec.md section 3). With r_i = h_i - means[y_i] (float64):
  //   u_i = proj @ r_i        (proj (B + K_w, D): B orthonormal basis rows, then the K_w classifier
  //                            rows when logit_offset is given)
  //   t_i = u_i[:B],  scores_i = mean_coords @ t_i     (mean_coords (K, B): the centred class means
  //                            m_c = mu_c - mu_G in the basis; score_error bounds |scores_i[c] -
  //                            m_c . r_i| / ||r_i||, the basis' span defect and rounding together)
  //   basis_sq[j]    = sum_i t_i[j]^2          (the within-class scatter along the basis)
  //   class_sq[c]    = sum_{y_i = c} ||r_i||^2 (per-class traces)
  //   ncc_i          = argmin_c ncc_bias[y_i, c] - 2 scores_i[c]   (nearest class centre; ties: lowest c;
  //                    ncc_bias[y, c] = ||means[y] - means[c]||^2, so this is argmin_c ||h_i - means[c]||^2;
  //                    where another class is within the error of the expansion, the squared
  //                    distances ||h_i - means[c]||^2 computed term by term decide)
  //   decisions[0]   = #{ncc_i == y_i}
  //   decisions[1]   = #{ncc_i != argmax_j (u_i[B + j] + logit_offset[y_i, j])} with a classifier,
  //                    #{ncc_i != predictions[i]} with predictions, else 0.
  m.def(
      "residual_stats(Tensor feats, Tensor labels, Tensor means, Tensor proj, Tensor mean_coords, Tensor ncc_bias, "
      "float score_error, Tensor? logit_offset, Tensor? predictions) -> (Tensor basis_sq, Tensor class_sq, "
      "Tensor decisions)");
  // One half-step of log-domain Sinkhorn (docs/spec.md section 4), batched over B problems:
  //   out[b, i] = -eps * log sum_j exp(log_w[b, j] + (h[b, j] - C[b, i, j]) / eps)
  // with C = max(||x_i||^2 + ||y_j||^2 - 2 x_i . y_j, 0) computed tile by tile from x (B, N, D) and
  // y (B, M, D) ("online", nothing of size N x M allocated), or read from cost (B, N, M) ("dense";
  // then x and y are None; with transpose, cost is (B, M, N) and C[b, i, j] = cost[b, j, i], so one
  // cost matrix serves both half-steps). h, log_w: (B, M). shift (B, N): an estimate of out (the
  // previous potential) that lets the kernel take the log-sum-exp in one pass; out does not
  // depend on it beyond rounding. All float32 or all float64.
  m.def(
      "sinkhorn_softmin(Tensor? x, Tensor? y, Tensor? cost, Tensor h, Tensor log_w, float eps, Tensor? shift=None, "
      "bool transpose=False) -> Tensor");
  // Row sums of the plan P_ij = exp(log_a_i + log_b_j + (f_i + g_j - C_ij) / eps), same cost
  // conventions: mass[b, i] = sum_j P_ij, cost[b, i] = sum_j P_ij C_ij. f, log_a: (B, N); g, log_b: (B, M).
  m.def(
      "sinkhorn_plan_sums(Tensor? x, Tensor? y, Tensor? cost, Tensor f, Tensor g, Tensor log_a, Tensor log_b, "
      "float eps) -> (Tensor mass, Tensor cost)");
  // The kernel of stabilised-scaling Sinkhorn (docs/spec.md section 4) from a cost (B, N, M) and
  // potentials f (B, N), g (B, M), formed as the plan's exponent is (the potentials' sum first):
  //   kernel[b, i, j] = exp(((f_i + g_j) - C_ij) / eps)   (0 below the dtype's range, inf above).
  m.def("sinkhorn_kernel(Tensor cost, Tensor f, Tensor g, float eps) -> Tensor");
  // One iteration of stabilised-scaling Sinkhorn (docs/spec.md section 4, Schmitzer 2019) on a stored
  // kernel K (B, N, M) = exp((f_i + g_j - C_ij) / eps), whose plan is P_ij = a_i u_i K_ij b_j v_j:
  //   s_i = sum_j K_ij b_j v_j,   u'_i = 1 / s_i,   v'_j = 1 / sum_i K_ij a_i u'_i,
  // K read once: each row's u'_i is final after its dot product, and the same row then adds to the
  // column sums. u, a: (B, N); v, b: (B, M). status (B, 2): status[b, 0] = sum_i a_i |u_i s_i - 1|,
  // the marginal error ||P 1 - a||_1 of the plan before the step (after the last v update);
  // status[b, 1] = max(|log2 u'_i|, |log2 v'_j|) over the problem, +inf where a new scaling is 0,
  // infinite or NaN (the caller then absorbs the scalings into f and g). All float32 or all float64.
  m.def("sinkhorn_scaling_step(Tensor kernel, Tensor u, Tensor v, Tensor a, Tensor b) -> (Tensor u, Tensor v, "
        "Tensor status)");
}

}  // namespace pfc_fast

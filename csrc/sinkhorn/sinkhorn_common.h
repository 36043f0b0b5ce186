// What the CPU and CUDA Sinkhorn kernels share (schemas in schemas.h): argument checks, the
// operands of the row folds, and the host side of the ops: the two log-domain ones hand a per-row
// Fold to the backend's sweep over all pairs, the two of the scaling solver their operands to the
// backend's kernel / scaling_step.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

namespace pfc_fast {

struct SoftminShape {
  int64_t batch, rows, cols, dim;  // dim = 0 in dense mode
  bool transpose;                  // dense, with the sum over the first index of cost
};

// Shapes of sinkhorn_softmin / sinkhorn_plan_sums: out (B, rows) from h, log_w (B, cols) and
// x (B, rows, D), y (B, cols, D), or cost (B, rows, cols), or with transpose cost (B, cols, rows).
inline SoftminShape check_softmin_args(const c10::optional<at::Tensor>& x, const c10::optional<at::Tensor>& y,
                                       const c10::optional<at::Tensor>& cost, const at::Tensor& h,
                                       const at::Tensor& log_w, double eps, bool transpose = false) {
  TORCH_CHECK(eps > 0, "pfc_fast: eps must be positive, got ", eps);
  const auto dtype = h.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "pfc_fast: sinkhorn ops compute in float32 or float64");
  TORCH_CHECK(h.dim() == 2 && log_w.sizes() == h.sizes(), "pfc_fast: h and log_w must both be (B, M)");
  TORCH_CHECK(log_w.scalar_type() == dtype && log_w.device() == h.device(), "pfc_fast: log_w must match h");
  const int64_t batch = h.size(0), cols = h.size(1);
  TORCH_CHECK(cols > 0, "pfc_fast: the column side needs at least one point");
  auto check = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.dim() == 3 && t.size(0) == batch, "pfc_fast: ", name, " must be 3-D with batch ", batch);
    TORCH_CHECK(t.scalar_type() == dtype, "pfc_fast: ", name, " must have the dtype of h");
    TORCH_CHECK(t.device() == h.device(), "pfc_fast: ", name, " must be on the device of h");
  };
  if (cost.has_value()) {
    TORCH_CHECK(!x.has_value() && !y.has_value(), "pfc_fast: give either cost or x and y");
    check(*cost, "cost");
    const int64_t sum_dim = transpose ? 1 : 2;
    TORCH_CHECK(cost->size(sum_dim) == cols, "pfc_fast: cost has ", cost->size(sum_dim), " points on the summed side",
                " but h has ", cols);
    return {batch, cost->size(transpose ? 2 : 1), cols, 0, transpose};
  }
  TORCH_CHECK(!transpose, "pfc_fast: transpose applies to a given cost matrix only");
  TORCH_CHECK(x.has_value() && y.has_value(), "pfc_fast: give either cost or x and y");
  check(*x, "x");
  check(*y, "y");
  TORCH_CHECK(y->size(2) == x->size(2), "pfc_fast: x and y must have the same dimension");
  TORCH_CHECK(y->size(1) == cols, "pfc_fast: y has ", y->size(1), " points but h has ", cols);
  return {batch, x->size(1), cols, x->size(2), false};
}

// The operands of the backends' row folds (their Fold::Args): sinkhorn_softmin writes out given
// eps and the shift, sinkhorn_plan_sums writes the row mass and cost of the plan given the row terms.
template <typename T>
struct SoftminArgs {
  T eps;
  T* out;
  const T* shift;  // (B * N) or nullptr
};

// The plan's exponent is formed as (f_i + g_j - C_ij) / eps + log a_i + log b_j, the potentials'
// sum against the cost first (as SinkhornResult.plan() does), so the sums stay those of the
// plan where f / eps and C / eps are far beyond 1 / (machine epsilon).
template <typename T>
struct PlanArgs {
  const T* f;      // (B * N)
  const T* log_a;  // (B * N)
  T* mass;
  T* cost;
};

// A (B, N) tensor with the dtype and device of `like` (row terms of the ops: f, log_a, shift).
inline void check_rows_tensor(const SoftminShape& shape, const at::Tensor& t, const char* name,
                              const at::Tensor& like) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == shape.batch && t.size(1) == shape.rows, "pfc_fast: ", name,
              " must be (B, N) = (", shape.batch, ", ", shape.rows, ")");
  TORCH_CHECK(t.scalar_type() == like.scalar_type() && t.device() == like.device(), "pfc_fast: ", name,
              " must have the dtype and device of h");
}

// The ops for a Backend providing SoftminFold<T> and PlanFold<T> (row folds, see the CPU file, with
// Args SoftminArgs<T> and PlanArgs<T>), `template <typename T, typename Fold> static void sweep(x, y,
// cost, h, log_w, T eps, shape, Fold::Args)` and `static auto guard(const at::Tensor&)` (a device guard, or nothing). `shift`
// (B, N), an estimate of the result (the previous potential), lets a backend take the log-sum-exp
// in one pass; the result does not depend on it beyond rounding.
template <typename Backend>
at::Tensor sinkhorn_softmin_op(const c10::optional<at::Tensor>& x, const c10::optional<at::Tensor>& y,
                               const c10::optional<at::Tensor>& cost, const at::Tensor& h_in,
                               const at::Tensor& log_w_in, double eps, const c10::optional<at::Tensor>& shift_in,
                               bool transpose) {
  const SoftminShape shape = check_softmin_args(x, y, cost, h_in, log_w_in, eps, transpose);
  if (shift_in.has_value()) check_rows_tensor(shape, *shift_in, "shift", h_in);
  [[maybe_unused]] const auto guard = Backend::guard(h_in);
  const at::Tensor h = h_in.contiguous(), log_w = log_w_in.contiguous();
  const at::Tensor shift = shift_in.has_value() ? shift_in->contiguous() : at::Tensor();
  at::Tensor out = at::empty({shape.batch, shape.rows}, h.options());
  if (shape.rows == 0 || shape.batch == 0) return out;  // nothing to launch (an empty CUDA grid fails)
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "sinkhorn_softmin", [&] {
    using Fold = typename Backend::template SoftminFold<scalar_t>;
    const SoftminArgs<scalar_t> args{static_cast<scalar_t>(eps), out.data_ptr<scalar_t>(),
                                     shift.defined() ? shift.data_ptr<scalar_t>() : nullptr};
    Backend::template sweep<scalar_t, Fold>(x, y, cost, h, log_w, static_cast<scalar_t>(eps), shape, args);
  });
  return out;
}

template <typename Backend>
std::tuple<at::Tensor, at::Tensor> sinkhorn_plan_sums_op(
    const c10::optional<at::Tensor>& x, const c10::optional<at::Tensor>& y, const c10::optional<at::Tensor>& cost,
    const at::Tensor& f, const at::Tensor& g_in, const at::Tensor& log_a, const at::Tensor& log_b_in, double eps) {
  const SoftminShape shape = check_softmin_args(x, y, cost, g_in, log_b_in, eps);
  check_rows_tensor(shape, f, "f", g_in);
  check_rows_tensor(shape, log_a, "log_a", g_in);
  [[maybe_unused]] const auto guard = Backend::guard(g_in);
  const at::Tensor g = g_in.contiguous(), log_b = log_b_in.contiguous();
  const at::Tensor f_rows = f.contiguous(), log_a_rows = log_a.contiguous();
  at::Tensor mass = at::empty({shape.batch, shape.rows}, g.options());
  at::Tensor total = at::empty({shape.batch, shape.rows}, g.options());
  if (shape.rows == 0 || shape.batch == 0) return {mass, total};
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "sinkhorn_plan_sums", [&] {
    using Fold = typename Backend::template PlanFold<scalar_t>;
    const PlanArgs<scalar_t> args{f_rows.data_ptr<scalar_t>(), log_a_rows.data_ptr<scalar_t>(),
                                  mass.data_ptr<scalar_t>(), total.data_ptr<scalar_t>()};
    Backend::template sweep<scalar_t, Fold>(x, y, cost, g, log_b, static_cast<scalar_t>(eps), shape, args);
  });
  return {mass, total};
}

// The operands of sinkhorn_kernel (schemas.h), contiguous: cost and kernel (B, N, M), f (B, N), g (B, M).
template <typename T>
struct KernelArgs {
  const T* cost;
  const T* f;
  const T* g;
  T* kernel;
  T eps;
  int64_t batch, rows, cols;
};

// The op for a Backend providing `template <typename T> static void kernel(const KernelArgs<T>&)`.
template <typename Backend>
at::Tensor sinkhorn_kernel_op(const at::Tensor& cost_in, const at::Tensor& f_in, const at::Tensor& g_in, double eps) {
  TORCH_CHECK(eps > 0, "pfc_fast: eps must be positive, got ", eps);
  const auto dtype = cost_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "pfc_fast: sinkhorn ops compute in float32 or float64");
  TORCH_CHECK(cost_in.dim() == 3, "pfc_fast: cost must be (B, N, M)");
  const int64_t batch = cost_in.size(0), rows = cost_in.size(1), cols = cost_in.size(2);
  TORCH_CHECK(f_in.dim() == 2 && f_in.size(0) == batch && f_in.size(1) == rows, "pfc_fast: f must be (B, N)");
  TORCH_CHECK(g_in.dim() == 2 && g_in.size(0) == batch && g_in.size(1) == cols, "pfc_fast: g must be (B, M)");
  for (const at::Tensor* t : {&f_in, &g_in}) {
    TORCH_CHECK(t->scalar_type() == dtype && t->device() == cost_in.device(),
                "pfc_fast: f and g must have the dtype and device of cost");
  }
  [[maybe_unused]] const auto guard = Backend::guard(cost_in);
  const at::Tensor cost = cost_in.contiguous(), f = f_in.contiguous(), g = g_in.contiguous();
  at::Tensor kernel = at::empty_like(cost);
  if (kernel.numel() == 0) return kernel;
  AT_DISPATCH_FLOATING_TYPES(dtype, "sinkhorn_kernel", [&] {
    const KernelArgs<scalar_t> args{cost.data_ptr<scalar_t>(), f.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(),
                                    kernel.data_ptr<scalar_t>(), static_cast<scalar_t>(eps), batch, rows, cols};
    Backend::template kernel<scalar_t>(args);
  });
  return kernel;
}

// The operands of sinkhorn_scaling_step (schemas.h), contiguous: kernel (B, N, M), u, a (B, N),
// v, b (B, M); outputs u_out (B, N), v_out (B, M), status (B, 2).
template <typename T>
struct ScalingArgs {
  const T* kernel;
  const T* u;
  const T* v;
  const T* a;
  const T* b;
  T* u_out;
  T* v_out;
  T* status;
  int64_t batch, rows, cols;
};

// status[b, 1] from the extremes of a problem's new scalings: max(|log2 lo|, |log2 hi|), +inf where
// one is not a positive finite number (bad: some scaling failed the test 0 < s < inf, NaN included).
template <typename T>
inline T scaling_spread(T lo, T hi, bool bad) {
  return bad ? std::numeric_limits<T>::infinity() : std::max(std::abs(std::log2(lo)), std::abs(std::log2(hi)));
}

// The op for a Backend providing `template <typename T> static void scaling_step(const ScalingArgs<T>&,
// const at::TensorOptions&)` (the options of u: for the backend's own buffers) and guard (as above).
template <typename Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> sinkhorn_scaling_step_op(const at::Tensor& kernel_in,
                                                                        const at::Tensor& u_in, const at::Tensor& v_in,
                                                                        const at::Tensor& a_in, const at::Tensor& b_in) {
  const auto dtype = kernel_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "pfc_fast: sinkhorn ops compute in float32 or float64");
  TORCH_CHECK(kernel_in.dim() == 3, "pfc_fast: kernel must be (B, N, M)");
  const int64_t batch = kernel_in.size(0), rows = kernel_in.size(1), cols = kernel_in.size(2);
  auto check = [&](const at::Tensor& t, int64_t n, const char* name) {
    TORCH_CHECK(t.dim() == 2 && t.size(0) == batch && t.size(1) == n, "pfc_fast: ", name, " must be (", batch, ", ",
                n, ")");
    TORCH_CHECK(t.scalar_type() == dtype && t.device() == kernel_in.device(), "pfc_fast: ", name,
                " must have the dtype and device of kernel");
  };
  check(u_in, rows, "u");
  check(a_in, rows, "a");
  check(v_in, cols, "v");
  check(b_in, cols, "b");
  [[maybe_unused]] const auto guard = Backend::guard(kernel_in);
  const at::Tensor kernel = kernel_in.contiguous(), u = u_in.contiguous(), v = v_in.contiguous();
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  at::Tensor u_out = at::empty_like(u), v_out = at::empty_like(v), status = at::zeros({batch, 2}, u.options());
  if (batch == 0 || rows == 0 || cols == 0) return {u_out, v_out, status};
  AT_DISPATCH_FLOATING_TYPES(dtype, "sinkhorn_scaling_step", [&] {
    const ScalingArgs<scalar_t> args{kernel.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                                     a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), u_out.data_ptr<scalar_t>(),
                                     v_out.data_ptr<scalar_t>(), status.data_ptr<scalar_t>(), batch, rows, cols};
    Backend::template scaling_step<scalar_t>(args, u.options());
  });
  return {u_out, v_out, status};
}

}  // namespace pfc_fast

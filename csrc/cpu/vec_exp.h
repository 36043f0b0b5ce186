// exp(x) written so that GCC/Clang vectorise it inside `omp simd` loops (libm's exp is a scalar
// call). Used by the Sinkhorn kernels: log-sum-exp reductions (arguments <= 0) and plan entries
// (arguments <= log of the total mass).
//
// Method (Cody & Waite range reduction, as in Cephes): x = n ln2 + r with n = round(x / ln2),
// |r| <= ln2 / 2, exp(r) from its Taylor polynomial (degree 6 in float, 13 in double: truncation
// below 1.2e-7, i.e. 2 float ulp, and 1e-17 relative), then exp(x) = 2^n exp(r) by writing n into the exponent bits.
// n is rounded with the 1.5 * 2^mantissa_bits trick, which also leaves n in the low bits.
// Inputs are clamped to [-87, 88] in float, [-708, 709] in double: below, the result is tiny
// (< 1e-37 or 1e-307) instead of 0, irrelevant next to the terms that matter; above, the largest
// finite power of two range is reached (exp overflows there anyway).
#pragma once
#include <bit>
#include <cstdint>

namespace pfc_fast {

template <typename T>
struct ExpConstants;

template <>
struct ExpConstants<float> {
  using Bits = int32_t;
  static constexpr float kMin = -87.0f;
  static constexpr float kMax = 88.0f;
  static constexpr float kLog2e = 1.44269504088896341f;
  static constexpr float kLn2Hi = 0.693359375f;
  static constexpr float kLn2Lo = -2.12194440e-4f;
  static constexpr float kShifter = 12582912.0f;  // 1.5 * 2^23
  static constexpr int kMantissaBits = 23;
  static constexpr Bits kBias = 127;
  static constexpr int kDegree = 6;
};

template <>
struct ExpConstants<double> {
  using Bits = int64_t;
  static constexpr double kMin = -708.0;
  static constexpr double kMax = 709.0;
  static constexpr double kLog2e = 1.4426950408889634074;
  static constexpr double kLn2Hi = 6.93145751953125e-1;
  static constexpr double kLn2Lo = 1.42860682030941723212e-6;
  static constexpr double kShifter = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr int kMantissaBits = 52;
  static constexpr Bits kBias = 1023;
  static constexpr int kDegree = 13;
};

// 1/k! for k = 0..13.
inline constexpr double kInverseFactorial[14] = {
    1.0, 1.0, 1.0 / 2, 1.0 / 6, 1.0 / 24, 1.0 / 120, 1.0 / 720, 1.0 / 5040, 1.0 / 40320, 1.0 / 362880,
    1.0 / 3628800, 1.0 / 39916800, 1.0 / 479001600, 1.0 / 6227020800.0};

// Nonpositive: the caller guarantees x <= 0 (a log-sum-exp term), so only the lower clamp is applied.
template <typename T, bool Nonpositive = false>
inline T vec_exp(T x) {
  using C = ExpConstants<T>;
  using Bits = typename C::Bits;
  x = x < C::kMin ? C::kMin : x;
  if constexpr (!Nonpositive) x = x > C::kMax ? C::kMax : x;
  const T shifted = x * C::kLog2e + C::kShifter;
  const T n = shifted - C::kShifter;
  const T r = (x - n * C::kLn2Hi) - n * C::kLn2Lo;
  T p = static_cast<T>(kInverseFactorial[C::kDegree]);  // Horner form of sum_k r^k / k!
#pragma GCC unroll 16
  for (int k = C::kDegree - 1; k >= 0; --k) p = p * r + static_cast<T>(kInverseFactorial[k]);
  const Bits n_bits = std::bit_cast<Bits>(shifted) - std::bit_cast<Bits>(C::kShifter);
  const T scale = std::bit_cast<T>(static_cast<Bits>((n_bits + C::kBias) << C::kMantissaBits));
  return p * scale;
}

}  // namespace pfc_fast

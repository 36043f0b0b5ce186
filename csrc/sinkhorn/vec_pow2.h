// 2^u written so that GCC/Clang vectorise it inside `omp simd` loops (libm's exp2 is a scalar
// call). The Sinkhorn kernels work in base 2: exp(x) = 2^(x log2 e), with log2 e folded into the
// terms and the inverse of eps they already multiply, which saves the range reduction's product.
//
// Method: u = n + f with n = round(u), |f| <= 1/2; 2^f = exp(f ln 2) from its Taylor polynomial
// (degree 6 in float, 13 in double: truncation below 1.2e-7, i.e. 2 float ulp, and 1e-17
// relative); 2^n written into the exponent bits. n is rounded with the 1.5 * 2^mantissa_bits
// trick, which also leaves n in the low bits. u is clamped to [-126, 127] in float, [-1022, 1023]
// in double: below, the result is the smallest normal number instead of 0, irrelevant next to
// the terms that matter; above, the largest power of two (2^u overflows there anyway).
//
// CPU kernel code: included inside PFC_CPU_ISA_BEGIN/END (common/cpu_isa.h), so each variant of the
// kernels gets its own copy, compiled for its instruction set.
#pragma once
#include <bit>
#include <cstdint>

#include "common/cpu_isa.h"

namespace pfc_fast {
namespace PFC_CPU_ISA {

inline constexpr double kLog2e = 1.4426950408889634074;
inline constexpr double kLn2 = 0.69314718055994530942;

template <typename T>
struct Pow2Constants;

template <>
struct Pow2Constants<float> {
  using Bits = int32_t;
  static constexpr float kMin = -126.0f;
  static constexpr float kMax = 127.0f;
  static constexpr float kShifter = 12582912.0f;  // 1.5 * 2^23
  static constexpr int kMantissaBits = 23;
  static constexpr Bits kBias = 127;
  static constexpr int kDegree = 6;
};

template <>
struct Pow2Constants<double> {
  using Bits = int64_t;
  static constexpr double kMin = -1022.0;
  static constexpr double kMax = 1023.0;
  static constexpr double kShifter = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr int kMantissaBits = 52;
  static constexpr Bits kBias = 1023;
  static constexpr int kDegree = 13;
};

// (ln 2)^k / k! for k = 0..13: the Taylor coefficients of 2^f = exp(f ln 2).
inline constexpr double kPow2Taylor[14] = {
    1.0,
    0.69314718055994530942,
    0.24022650695910071233,
    0.055504108664821579953,
    0.0096181291076284771620,
    0.0013333558146428443423,
    1.5403530393381609954e-4,
    1.5252733804059840280e-5,
    1.3215486790144309488e-6,
    1.0178086009239699727e-7,
    7.0549116208011233298e-9,
    4.4455382718708114976e-10,
    2.5678435993488202649e-11,
    1.3691488853904124104e-12};

// Nonpositive: the caller guarantees u <= 0 (a log-sum-exp term), so only the lower clamp applies.
template <typename T, bool Nonpositive = false>
inline T vec_pow2(T u) {
  using C = Pow2Constants<T>;
  using Bits = typename C::Bits;
  u = u < C::kMin ? C::kMin : u;
  if constexpr (!Nonpositive) u = u > C::kMax ? C::kMax : u;
  const T shifted = u + C::kShifter;
  const T f = u - (shifted - C::kShifter);
  T p = static_cast<T>(kPow2Taylor[C::kDegree]);
#pragma GCC unroll 16
  for (int k = C::kDegree - 1; k >= 0; --k) p = p * f + static_cast<T>(kPow2Taylor[k]);
  const Bits n_bits = std::bit_cast<Bits>(shifted) - std::bit_cast<Bits>(C::kShifter);
  return p * std::bit_cast<T>(static_cast<Bits>((n_bits + C::kBias) << C::kMantissaBits));
}

}  // namespace PFC_CPU_ISA
}  // namespace pfc_fast

// The CPU kernels of each op family (csrc/<family>/<family>_cpu.cpp) are compiled for the x86-64
// baseline and, on x86-64 builds without -march=native, twice more: with AVX2 and FMA
// (<family>_cpu_avx2.cpp, the x86-64-v3 level of every x86 CPU since about 2015) and with AVX-512
// (<family>_cpu_avx512.cpp, x86-64-v4: F, BW, DQ, VL); each defines its PFC_CPU_*_VARIANT and
// includes the first. csrc/pfc_fast.cpp registers the best variant the CPU it runs on supports,
// when pfc_fast._C loads (setup.py defines PFC_CPU_VARIANTS where the three exist).
//
// A kernel file includes its headers first (they stay baseline code in both variants, so the
// functions they define inline are the same everywhere), then puts its kernels between
// PFC_CPU_ISA_BEGIN and PFC_CPU_ISA_END in namespace pfc_fast::PFC_CPU_ISA.
#pragma once
#include <torch/library.h>

#if defined(PFC_CPU_AVX2_VARIANT) || defined(PFC_CPU_AVX512_VARIANT)
#ifdef PFC_CPU_AVX2_VARIANT
#define PFC_CPU_ISA avx2
#define PFC_CPU_TARGET "avx2,fma"
#else
#define PFC_CPU_ISA avx512
#define PFC_CPU_TARGET "avx2,fma,avx512f,avx512bw,avx512dq,avx512vl"
#endif
#define PFC_PRAGMA_TEXT(text) _Pragma(#text)
#define PFC_PRAGMA(text) PFC_PRAGMA_TEXT(text)  // expands PFC_CPU_TARGET first
#if defined(__clang__)
#define PFC_CPU_ISA_BEGIN PFC_PRAGMA(clang attribute push(__attribute__((target(PFC_CPU_TARGET))), apply_to = function))
#define PFC_CPU_ISA_END _Pragma("clang attribute pop")
#else
#define PFC_CPU_ISA_BEGIN _Pragma("GCC push_options") PFC_PRAGMA(GCC target(PFC_CPU_TARGET))
#define PFC_CPU_ISA_END _Pragma("GCC pop_options")
#endif
#else
#define PFC_CPU_ISA baseline
#define PFC_CPU_ISA_BEGIN
#define PFC_CPU_ISA_END
#endif

namespace pfc_fast {

// The best variant this CPU runs: 2 (AVX-512), 1 (AVX2 + FMA) or 0 (baseline).
inline int cpu_level() {
#if defined(__x86_64__) || defined(__i386__)
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl"))
    return 2;
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0;
#else
  return 0;
#endif
}

// The registrations of each variant's CPU kernels (m.impl of the family's ops).
namespace baseline {
void register_nc_cpu(torch::Library& m);
void register_sinkhorn_cpu(torch::Library& m);
}  // namespace baseline
namespace avx2 {
void register_nc_cpu(torch::Library& m);
void register_sinkhorn_cpu(torch::Library& m);
}  // namespace avx2
namespace avx512 {
void register_nc_cpu(torch::Library& m);
void register_sinkhorn_cpu(torch::Library& m);
}  // namespace avx512

}  // namespace pfc_fast

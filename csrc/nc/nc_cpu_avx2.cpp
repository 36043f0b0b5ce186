// nc_cpu.cpp's kernels compiled for AVX2 and FMA (csrc/common/cpu_isa.h).
#define PFC_CPU_AVX2_VARIANT
#include "nc/nc_cpu.cpp"

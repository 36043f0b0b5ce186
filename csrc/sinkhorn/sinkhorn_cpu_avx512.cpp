// sinkhorn_cpu.cpp's kernels compiled for AVX-512 (csrc/common/cpu_isa.h).
#define PFC_CPU_AVX512_VARIANT
#include "sinkhorn/sinkhorn_cpu.cpp"

// The CUDA kernels of the NC passes (csrc/nc/nc_cuda.cu), built by the host compiler for the
// SIMT layer and registered as pfc_fast_simt::class_sums and pfc_fast_simt::residual_stats.
#include "nc/nc_cuda.cu"

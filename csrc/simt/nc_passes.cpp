// The CUDA kernels of the NC passes (csrc/cuda/nc_passes.cu), built by the host compiler for the
// SIMT layer and registered as pfc_fast_simt::class_sums and pfc_fast_simt::residual_stats.
#include "../cuda/nc_passes.cu"

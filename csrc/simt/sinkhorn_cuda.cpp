// The CUDA kernels of the Sinkhorn ops (csrc/sinkhorn/sinkhorn_cuda.cu), built by the host compiler for the
// SIMT layer and registered as pfc_fast_simt::sinkhorn_softmin and pfc_fast_simt::sinkhorn_plan_sums.
#include "sinkhorn/sinkhorn_cuda.cu"

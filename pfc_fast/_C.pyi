# The compiled core (csrc/pfc_fast.cpp): build constants; its operators are torch.ops.pfc_fast.*.
with_cuda: int
with_openmp: int
native: int
cpu_kernels: str
torch_version_major: int
torch_version_minor: int
torch_version_patch: int

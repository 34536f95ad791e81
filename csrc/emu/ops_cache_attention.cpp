// The emulator's build of the torch glue csrc/ops/cache_attention.cpp (ops torch.ops.kvkernels_emu.*, CPU tensors).
#include "ops/cache_attention.cpp"

// The emulator's build of the torch glue csrc/ops/append.cpp (ops torch.ops.kvkernels_emu.*, CPU tensors).
#include "ops/append.cpp"

// The emulator's build of the torch glue csrc/ops/prefill.cpp (ops torch.ops.kvkernels_emu.*, CPU tensors).
#include "ops/prefill.cpp"

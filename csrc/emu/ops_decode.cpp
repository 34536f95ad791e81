// The emulator's build of the torch glue csrc/ops/decode.cpp (ops torch.ops.kvkernels_emu.*, CPU tensors).
#include "ops/decode.cpp"

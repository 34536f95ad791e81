// KVK_LAUNCH(grid, block, smem_bytes, stream, kernel)(args...): a kernel launch that the CPU
// emulator can run too. With nvcc it is exactly kernel<<<grid, block, smem_bytes, stream>>>(args...);
// built with KVK_EMULATE (csrc/emu/) it runs the grid on the host, block after block, each CUDA
// thread a fiber. The kernel comes last because its template arguments may hold commas.
#pragma once

#if defined(KVK_EMULATE)
#include "emu/device.h"
#define KVK_LAUNCH(grid, block, smem, stream, ...) \
  ::kvk::emu::make_launch(#__VA_ARGS__, __VA_ARGS__, dim3(grid), dim3(block), static_cast<size_t>(smem))
#else
#define KVK_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#endif

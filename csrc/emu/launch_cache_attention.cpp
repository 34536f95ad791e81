// The emulator's build of csrc/launch/cache_attention.cu (the same source, host C++ under KVK_EMULATE).
#include "launch/cache_attention.cu"

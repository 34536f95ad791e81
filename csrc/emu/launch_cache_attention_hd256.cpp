// The emulator's build of csrc/launch/cache_attention_hd256.cu (the same source, host C++ under KVK_EMULATE).
#include "launch/cache_attention_hd256.cu"

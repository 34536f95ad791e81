// The emulator's build of csrc/launch/cache_attention_hd64.cu (the same source, host C++ under KVK_EMULATE).
#include "launch/cache_attention_hd64.cu"

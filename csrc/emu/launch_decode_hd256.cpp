// The emulator's build of csrc/launch/decode_hd256.cu (the same source, host C++ under KVK_EMULATE).
#include "launch/decode_hd256.cu"

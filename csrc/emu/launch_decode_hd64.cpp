// The emulator's build of csrc/launch/decode_hd64.cu (the same source, host C++ under KVK_EMULATE).
#include "launch/decode_hd64.cu"

// The emulator's build of csrc/launch/decode.cu (the same source, host C++ under KVK_EMULATE).
#include "launch/decode.cu"

// The emulator's build of csrc/launch/prefill.cu (the same source, host C++ under KVK_EMULATE).
#include "launch/prefill.cu"

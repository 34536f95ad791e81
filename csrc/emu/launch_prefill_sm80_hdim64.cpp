// The emulator's build of csrc/launch/prefill_sm80_hdim64.cu (the same source, host C++ under KVK_EMULATE).
#include "launch/prefill_sm80_hdim64.cu"

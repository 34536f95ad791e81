// The emulator's build of csrc/launch/append.cu (the same source, host C++ under KVK_EMULATE).
#include "launch/append.cu"

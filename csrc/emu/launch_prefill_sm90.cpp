// The emulator's build of the sm_90a prefill launchers (csrc/launch/prefill_sm90_hdim*.cu, the same
// sources, host C++ under KVK_EMULATE): one translation unit, as the three are small.
#include "launch/prefill_sm90_hdim64.cu"
#include "launch/prefill_sm90_hdim128.cu"
#include "launch/prefill_sm90_hdim256.cu"

// The sm_90a prefill kernel (wgmma, TMA, mbarrier) has no emulation yet: its launchers report that
// to the caller, and the emulator answers compute capability 8.0, so the glue never picks path 90.
#include "launch/prefill.h"

namespace kvk {

cudaError_t prefill_sm90_hdim64(bool, const PrefillParams&, cudaStream_t) { return cudaErrorNotSupported; }
cudaError_t prefill_sm90_hdim128(bool, const PrefillParams&, cudaStream_t) { return cudaErrorNotSupported; }
cudaError_t prefill_sm90_hdim256(bool, const PrefillParams&, cudaStream_t) { return cudaErrorNotSupported; }

}  // namespace kvk

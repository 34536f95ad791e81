"""The CUDA backend declines devices its binary holds no code for, so auto selection falls back
to Triton instead of failing with "no kernel image": an "8.0;9.0a" build runs on sm_80..sm_89 (the
sm_80 cubin) and sm_90 (the sm_90a cubin), not on sm_100 or sm_120. The device is a stand-in: a
meta tensor reporting a CUDA device, with the capability mocked."""

from __future__ import annotations

import pytest
import torch

import kvkernels.cuda
from kvkernels.cuda import append, decode, prefill

pytestmark = pytest.mark.skipif(kvkernels.cuda.extension_reason() is not None,
                                reason="the CUDA extension is not built")


class OnCuda:
    """A meta tensor that reports CUDA device 0."""

    device = torch.device("cuda", 0)

    def __init__(self, t: torch.Tensor):
        self._t = t

    def __getattr__(self, name):
        return getattr(self._t, name)


def meta(*shape, dtype=torch.float16):
    return OnCuda(torch.empty(*shape, dtype=dtype, device="meta"))


def reasons() -> dict[str, str | None]:
    q, kc = meta(2, 8, 128), meta(2, 64, 2, 128)
    k = meta(2, 3, 2, 128)
    pq, pk = meta(1, 32, 8, 128), meta(1, 32, 2, 128)
    return {
        "decode": decode.unsupported("decode", q=q, k_cache=kc, v_cache=kc),
        "append": append.unsupported("append", k=k, v=k, k_cache=kc, v_cache=kc),
        "append_slots": append.unsupported("append_slots", k=meta(6, 2, 128), v=meta(6, 2, 128), k_cache=kc,
                                           v_cache=kc),
        "prefill": prefill.unsupported("prefill", q=pq, k=pk, v=pk),
    }


@pytest.fixture
def capability(monkeypatch):
    def set_capability(cap, archs="8.0;9.0a"):
        monkeypatch.setattr(kvkernels.cuda, "device_capability", lambda index: cap)
        monkeypatch.setattr(kvkernels.cuda, "arch_list", lambda: archs)
        monkeypatch.setattr(prefill, "_device", lambda index: (cap, 227 * 1024))
    return set_capability


@pytest.mark.parametrize("cap", [(10, 0), (12, 0), (7, 5)], ids=["sm100", "sm120", "sm75"])
def test_devices_without_code_in_the_binary_are_declined(capability, cap):
    capability(cap)
    for op, reason in reasons().items():
        assert reason is not None and f"{cap[0]}.{cap[1]}" in reason, (op, reason)


@pytest.mark.parametrize("cap", [(8, 0), (8, 6), (8, 9), (9, 0)], ids=["sm80", "sm86", "sm89", "sm90"])
def test_devices_with_code_in_the_binary_are_taken(capability, cap):
    capability(cap)
    assert reasons() == {"decode": None, "append": None, "append_slots": None, "prefill": None}


def test_ptx_in_the_build_covers_newer_devices(capability):
    capability((12, 0), archs="8.0+PTX")
    assert reasons()["decode"] is None

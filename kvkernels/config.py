"""Process-wide switches, each also settable from the environment.

KVKERNELS_BACKEND=cuda|triton|reference   overrides the automatic backend choice (backend=None)
KVKERNELS_CHECK=1                         validate device-side indices (cache_seqlens, block_table,
                                          slot_mapping, cu_seqlens) on CUDA tensors too, at the cost
                                          of one device synchronisation per call
KVKERNELS_BATCH_INVARIANT=1               decode splits the context at fixed token boundaries, so a
                                          sequence's output bits do not depend on the rest of the batch
"""

from __future__ import annotations

import os

BACKENDS = ("cuda", "triton", "reference")

# TRITON_INTERPRET as the user's environment had it, before kvkernels.triton sets it on a machine
# without a GPU (this module is imported first). None: unset by the user.
USER_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET")

_overrides: dict[str, bool] = {}


def _flag(name: str, env: str) -> bool:
    if name in _overrides:
        return _overrides[name]
    return os.environ.get(env, "0") not in ("", "0", "false", "False")


def checked_mode() -> bool:
    """Whether device-side indices are validated on CUDA tensors (one sync per call)."""
    return _flag("check", "KVKERNELS_CHECK")


def batch_invariant() -> bool:
    """Whether decode uses split boundaries fixed in tokens (batch-invariant bits)."""
    return _flag("batch_invariant", "KVKERNELS_BATCH_INVARIANT")


def backend_override() -> str | None:
    value = os.environ.get("KVKERNELS_BACKEND", "").strip().lower()
    if not value or value == "auto":
        return None
    if value not in BACKENDS:
        raise ValueError(f"KVKERNELS_BACKEND={value!r}: expected one of {BACKENDS} or 'auto'")
    return value


class _Override:
    """Sets a switch now; as a context manager, restores the previous value on exit."""

    def __init__(self, name: str, value: bool):
        self._name = name
        self._had, self._old = name in _overrides, _overrides.get(name)
        _overrides[name] = bool(value)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._had:
            _overrides[self._name] = self._old
        else:
            _overrides.pop(self._name, None)


def set_checked_mode(enabled: bool = True) -> _Override:
    """Validate device-side indices on CUDA tensors. Takes effect at once; inside `with` it is
    undone on exit."""
    return _Override("check", enabled)


def set_batch_invariant(enabled: bool = True) -> _Override:
    """Batch-invariant decode splits. Takes effect at once; inside `with` it is undone on exit:

        with kvkernels.set_batch_invariant():
            out = kvkernels.decode_attention(...)
    """
    return _Override("batch_invariant", enabled)

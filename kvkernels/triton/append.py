"""Triton append: write new keys/values into the KV cache in place (twin of csrc/kernels/append.cuh).

One program writes one token's rows for a block of heads, K and V together; a ragged batch (k/v
[T, Hkv, D] + cu_seqlens) finds each token's sequence by binary search in the kernel. Same contract
as the CUDA kernels and the reference, bit for bit:
  * a cache of the source's dtype gets the source bits unchanged: the kernel moves raw integers
    (the tensors are viewed as int16 / int32 / ... of the same size), so no dtype ever goes through
    float arithmetic;
  * a float8_e4m3fn or float8_e5m2 cache gets saturate(value / scale[h]) rounded to nearest even,
    from fp16, bf16, fp32 or fp64 sources: value is widened (fp64 rounded) to fp32, divided with IEEE
    rounding (tl.math.div_rn; `/` is an approximate division on NVIDIA GPUs) and converted by integer
    arithmetic: e4m3 by the algorithm of torch's own fp32 -> e4m3 conversion (`_e4m3_bits`), e5m2 as
    the hardware's cvt.rn.satfinite.e5m2x2.f32 converts (`_e5m2_bits`). No fp8 type is used, so
    both formats compile for every GPU and are exact in the interpreter.
  * positions past the cache, invalid pages and negative or out-of-range slots are skipped.
  * fused rotary embedding (ROTARY != 0): each key is rotated at its position in fp32 before the
    conversion above, bit for bit kvkernels.reference.rotary_fp32: x1*cos - x2*sin and x2*cos + x1*sin,
    every product and sum rounded on its own. Compiled, Triton would contract a*b - c*d into a fused
    multiply-add (one rounding fewer, different bits), so the kernel then calls libdevice's mul_rn /
    add_rn / sub_rn, which are never contracted; the interpreter has no libdevice but computes with
    numpy, which never contracts, so there (EXACT_RN=False) plain operators give the same bits. The
    rotated key is rounded once: fp16 by the cast (round to nearest even, compiled and in numpy), bf16
    by integer arithmetic (_bf16_bits; the interpreter's fp32 -> bf16 cast truncates), fp8 as above.
    A token whose position has no row in the cos/sin table is not written.
Any head dim, any strides; no alignment needed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from . import INTERPRET, KernelConfig, Launch


# Addressing modes (constexpr MODE)
_CONTIGUOUS, _PAGED, _SLOTS = 0, 1, 2
# Source kinds (constexpr SRC): a raw copy, or the float format to quantize from
_COPY, _F16, _BF16, _F32, _F64 = 0, 1, 2, 3, 4
_RAW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
# fp8 formats (constexpr FP8FMT of a quantizing append)
_E4M3, _E5M2 = 1, 2
_FP8_FORMAT = {torch.float8_e4m3fn: _E4M3, torch.float8_e5m2: _E5M2}
_QUANT_SOURCES = {torch.float16: _F16, torch.bfloat16: _BF16, torch.float32: _F32, torch.float64: _F64}
_MAX_TILE = 4096  # elements of one [BLOCK_H, BLOCK_D] tile
# Rotary layouts (constexpr ROTARY)
_NO_ROTARY, _NEOX, _GPTJ = 0, 1, 2
_FLOAT_KINDS = {torch.float16: _F16, torch.bfloat16: _BF16, torch.float32: _F32}


@triton.jit
def _e4m3_bits(y):
    """fp32 -> float8_e4m3fn bits (uint8) = torch's `y.clamp(-448, 448).to(torch.float8_e4m3fn)`.

    |y| is clamped to 448 (inf included) on its bit pattern, which is ordered like the value;
    subnormals (|y| < 2^-6) round to a multiple of 2^-9 by adding 2^14 in fp32 (round to nearest
    even); normals rebias the exponent 127 -> 7 and round the mantissa from 23 to 3 bits, ties to
    even; NaN becomes 0x7F with y's sign. Integer arithmetic is used rather than a cast to
    tl.float8e4nv: that cast needs sm_89+ on GPUs, and the interpreter's version rounds wrongly
    (tests/test_append.py::test_interpreter_fp8_cast_is_wrong shows it).
    """
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = bits & 0x7FFFFFFF
    is_nan = a > 0x7F800000
    a = tl.minimum(a, 0x43E00000)
    subnormal = (a.to(tl.float32, bitcast=True) + 16384.0).to(tl.int32, bitcast=True) - (141 << 23)
    normal = (a + ((7 - 127) << 23) + 0x7FFFF + ((a >> 20) & 1)) >> 20
    r = tl.where(a < (121 << 23), subnormal, normal)
    r = tl.where(is_nan, 0x7F, r)
    return (r | sign).to(tl.uint8)


@triton.jit
def _e5m2_bits(y):
    """fp32 -> float8_e5m2 bits (uint8) as the hardware's cvt.rn.satfinite.e5m2x2.f32 converts
    (kvkernels.reference.e5m2_satfinite): |y| is clamped to 57344 (inf included) on its bit pattern;
    subnormals (|y| < 2^-14) round to a multiple of 2^-16 by adding 2^7 in fp32 (round to nearest
    even); normals rebias the exponent 127 -> 15 and round the mantissa from 23 to 2 bits, ties to
    even; NaN becomes 0x7F whatever its sign."""
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = bits & 0x7FFFFFFF
    is_nan = a > 0x7F800000
    a = tl.minimum(a, 0x47600000)
    subnormal = (a.to(tl.float32, bitcast=True) + 128.0).to(tl.int32, bitcast=True) - (134 << 23)
    normal = (a + ((15 - 127) << 23) + 0xFFFFF + ((a >> 21) & 1)) >> 21
    r = tl.where(a < (113 << 23), subnormal, normal) | sign
    r = tl.where(is_nan, 0x7F, r)
    return r.to(tl.uint8)


@triton.jit
def _fp8_bits(y, FP8FMT: tl.constexpr):
    if FP8FMT == 2:
        return _e5m2_bits(y)
    else:
        return _e4m3_bits(y)


@triton.jit
def _to_fp32(x, SRC: tl.constexpr):
    if SRC == 2:  # bf16 held as int16 bits: widening is a 16-bit shift, exact
        return ((x.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def _bf16_bits(y):
    """fp32 -> bfloat16 bits (int16), round to nearest even: torch's `y.to(torch.bfloat16)` for every
    non-NaN value (NaN becomes a quiet NaN of y's sign). Integer arithmetic, because the interpreter's
    fp32 -> bf16 cast truncates."""
    bits = y.to(tl.int32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    return tl.where(nan, (bits >> 16) | 0x0040, rounded).to(tl.int16)


@triton.jit
def _from_fp32_bits(y, KIND: tl.constexpr):
    """fp32 -> the raw bits (int16 / int32) of KIND (fp16, bf16, fp32), rounded to nearest even."""
    if KIND == 1:
        return y.to(tl.float16).to(tl.int16, bitcast=True)
    elif KIND == 2:
        return _bf16_bits(y)
    else:
        return y.to(tl.int32, bitcast=True)


@triton.jit
def _mul(a, b, EXACT_RN: tl.constexpr):
    if EXACT_RN:
        return libdevice.mul_rn(a, b)
    else:
        return a * b


@triton.jit
def _rotate(x, xp, c, s, first, EXACT_RN: tl.constexpr):
    """x * c - xp * s where first (x is x1 of its pair, xp its x2), else x * c + xp * s (x is x2):
    the reference's x1*cos - x2*sin, x2*cos + x1*sin, each operation rounded on its own."""
    xc = _mul(x, c, EXACT_RN)
    ps = _mul(xp, s, EXACT_RN)
    if EXACT_RN:
        return tl.where(first, libdevice.sub_rn(xc, ps), libdevice.add_rn(xc, ps))
    else:
        return tl.where(first, xc - ps, xc + ps)


@triton.jit
def _ragged_sequence(Cu, stride_cu, t, num_seqs, steps):
    """Ragged append: the sequence b of token t, the last b in [0, num_seqs) with cu_seqlens[b] <= t,
    by binary search (steps = ceil(log2 num_seqs) iterations, a fixed count so every program runs the
    same loop; no host-side token -> sequence map, so nothing to build and no sync).
    -> (b, i = t - cu_seqlens[b], ok). ok is False when t lies in no sequence, which only a
    cu_seqlens that is not valid offsets gives; every load stays inside cu_seqlens[0 .. num_seqs]."""
    lo = t * 0
    hi = lo + num_seqs - 1
    for _ in range(steps):
        active = lo < hi
        mid = (lo + hi + 1) // 2  # in (lo, hi] while active, lo once the search is done
        go = tl.load(Cu + mid * stride_cu).to(tl.int64) <= t
        next_lo = tl.where(active, tl.where(go, mid, lo), lo)
        hi = tl.where(active, tl.where(go, hi, mid - 1), hi)
        lo = next_lo
    start = tl.load(Cu + lo * stride_cu).to(tl.int64)
    end = tl.load(Cu + (lo + 1) * stride_cu).to(tl.int64)
    return lo, t - start, (t >= start) & (t < end)


@triton.jit
def _append_kernel(
    K, V,              # [B, S_new, Hkv, D] sources (slots: [T, 1, Hkv, D]); raw ints when SRC == 0
    KC, VC,            # [num_pages, page_size, Hkv, D] caches (contiguous: B pages of S_max rows); raw ints or uint8 (fp8)
    Seqlens,           # [B] int32 (MODE 0, 1)
    BlockTable,        # [B, max_pages] int32 (MODE 1)
    Slots,             # [T] int32/int64 (MODE 2)
    Cu,                # [B + 1] int32 (RAGGED): sequence b's tokens are source rows Cu[b] .. Cu[b + 1] - 1
    KScale, VScale,    # [Hkv] fp32 (fp8 caches), stride 0 for one scale per tensor
    Cos, Sin,          # [max_position, rotary_half] (ROTARY): fp16 / fp32, or bf16 as int16 bits
    Positions,         # [T] int32/int64 (ROTARY, MODE 2): token t's position
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_kcp, stride_kcr, stride_kch, stride_vcp, stride_vcr, stride_vch,
    stride_seq, stride_btb, stride_btp, stride_slot, stride_ksc, stride_vsc, stride_cu,
    stride_cos, stride_sin, stride_pos,
    S_new, num_pages, page_size, max_pages, Hkv, D, num_seqs, search_steps, max_position, rotary_half,
    MODE: tl.constexpr, SRC: tl.constexpr, RAGGED: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    ROTARY: tl.constexpr = 0, KFLOAT: tl.constexpr = 0, COSFLOAT: tl.constexpr = 0,
    EXACT_RN: tl.constexpr = False, FP8FMT: tl.constexpr = 1,
):
    """cache[page, row, h, :] = convert(src[b, i, h, :]) for the heads of one program, K and V.

    grid (B * S_new, cdiv(Hkv, BLOCK_H)); ragged and slots: (T, ...) with sources [T, 1, Hkv, D].
    MODE 0: page = b, row = cache_seqlens[b] + i;
    MODE 1: position p = cache_seqlens[b] + i, page = block_table[b, p // page_size],
    row = p % page_size; MODE 2: s = slot_mapping[t], page = s // page_size, row = s % page_size.
    RAGGED (MODE 0, 1): token t is token i = t - cu_seqlens[b] of the sequence b found by
    _ragged_sequence.
    A row outside the cache is not written. convert: identity (SRC 0) or
    fp8(saturate(fp32(src) / scale[h])), fp8 = e4m3 (FP8FMT 1) or e5m2 (FP8FMT 2), K and V alike.
    ROTARY (1 GPT-NeoX halves, 2 GPT-J pairs): the key is first rotated in fp32 at position p (MODE 0, 1)
    or Positions[t] (MODE 2) over its first 2 * rotary_half dims; KFLOAT / COSFLOAT name the float
    formats of k and of the tables (loaded as fp16 / fp32 values, bf16 as int16 bits; _to_fp32 widens).
    A copy cache (SRC 0) gets the rotated key rounded to KFLOAT, an fp8 cache its quantization.
    """
    token = tl.program_id(0).to(tl.int64)
    b = token // S_new  # the source row (b, i); ragged and slots: (t, 0)
    i = token % S_new
    seq = b  # the cache sequence and its new token's index
    idx = i
    ok_seq = token >= 0
    if RAGGED:
        seq, idx, ok_seq = _ragged_sequence(Cu, stride_cu, token, num_seqs, search_steps)
    if MODE == 2:
        slot = tl.load(Slots + b * stride_slot).to(tl.int64)
        ok = slot >= 0
        slot = tl.where(ok, slot, 0)
        page = slot // page_size
        row = slot % page_size
        ok = ok & (page < num_pages)
    else:
        pos = tl.load(Seqlens + seq * stride_seq).to(tl.int64) + idx
        ok = ok_seq & (pos >= 0)
        pos = tl.where(ok, pos, 0)
        if MODE == 0:
            page = seq
            row = pos
            ok = ok & (pos < page_size) & (seq < num_pages)
        else:
            logical = pos // page_size
            row = pos % page_size
            ok = ok & (logical < max_pages)
            page = tl.load(BlockTable + seq * stride_btb + logical * stride_btp, mask=ok, other=-1).to(tl.int64)
            ok = ok & (page >= 0) & (page < num_pages)
    if ROTARY != 0:
        if MODE == 2:
            rpos = tl.load(Positions + b * stride_pos).to(tl.int64)
        else:
            rpos = pos
        ok = ok & (rpos >= 0) & (rpos < max_position)
        rpos = tl.where(ok, rpos, 0)

    offs_h = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    h_ok = offs_h < Hkv
    mask = (h_ok[:, None] & (offs_d < D)[None, :]) & ok
    k_src = K + b * stride_kb + i * stride_ks + offs_h[:, None] * stride_kh + offs_d[None, :]
    v_src = V + b * stride_vb + i * stride_vs + offs_h[:, None] * stride_vh + offs_d[None, :]
    k_dst = KC + page * stride_kcp + row * stride_kcr + offs_h[:, None] * stride_kch + offs_d[None, :]
    v_dst = VC + page * stride_vcp + row * stride_vcr + offs_h[:, None] * stride_vch + offs_d[None, :]
    k = tl.load(k_src, mask=mask)
    v = tl.load(v_src, mask=mask)
    if ROTARY != 0:
        if ROTARY == 1:  # GPT-NeoX: pair j is (x[j], x[j + half])
            first = offs_d < rotary_half
            partner = tl.where(first, offs_d + rotary_half, offs_d - rotary_half)
            j = tl.where(first, offs_d, offs_d - rotary_half)
        else:  # GPT-J: pair j is (x[2j], x[2j + 1])
            first = (offs_d % 2) == 0
            partner = offs_d ^ 1
            j = offs_d // 2
        rotated = offs_d < 2 * rotary_half
        r_mask = mask & rotated[None, :]
        kp = tl.load(K + b * stride_kb + i * stride_ks + offs_h[:, None] * stride_kh + partner[None, :], mask=r_mask)
        c = tl.load(Cos + rpos * stride_cos + j, mask=rotated & ok)
        sn = tl.load(Sin + rpos * stride_sin + j, mask=rotated & ok)
        x = _to_fp32(k, KFLOAT)
        xp = _to_fp32(kp, KFLOAT)
        c = _to_fp32(c, COSFLOAT)
        sn = _to_fp32(sn, COSFLOAT)
        kf = tl.where(rotated[None, :], _rotate(x, xp, c[None, :], sn[None, :], first[None, :], EXACT_RN), x)
    if SRC == 0:
        if ROTARY != 0:
            tl.store(k_dst, _from_fp32_bits(kf, KFLOAT), mask=mask)
        else:
            tl.store(k_dst, k, mask=mask)
        tl.store(v_dst, v, mask=mask)
    else:
        k_scale = tl.load(KScale + offs_h * stride_ksc, mask=h_ok, other=1.0)
        v_scale = tl.load(VScale + offs_h * stride_vsc, mask=h_ok, other=1.0)
        if ROTARY == 0:
            kf = _to_fp32(k, SRC)
        tl.store(k_dst, _fp8_bits(tl.math.div_rn(kf, k_scale[:, None]), FP8FMT), mask=mask)
        tl.store(v_dst, _fp8_bits(tl.math.div_rn(_to_fp32(v, SRC), v_scale[:, None]), FP8FMT), mask=mask)


def unsupported(op: str, **kw) -> str | None:
    return None  # every dtype, head dim and layout the public API accepts


def _raw(t: torch.Tensor) -> torch.Tensor:
    """The same memory as integers of the same size (a view: no copy)."""
    return t.view(_RAW[t.element_size()])


def plan(k, v, k_cache, v_cache, mode, seqlens, block_table, slots, k_scale, v_scale,
         cu_seqlens=None, rotary=None) -> Launch | None:
    """k/v [B, S_new, Hkv, D] (ragged: [T, 1, Hkv, D] with cu_seqlens [B + 1]; strided views fine);
    rotary: None or (cos, sin [max_position, rotary_dim / 2], interleaved, positions [T] or None);
    see _append_kernel. None: nothing to write.
    The plan does not depend on the GPU (no dot, no pipeline: shared memory is never used)."""
    B, s_new, hkv, d = k.shape
    num_seqs = 0 if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if B * s_new == 0 or hkv * d == 0 or k_cache.shape[0] * k_cache.shape[1] == 0:
        return None  # nothing to write (and no division by a page size of 0)
    if cu_seqlens is not None and num_seqs == 0:
        return None  # no sequence for a token to belong to
    # bf16 note (the interpreter keeps bf16 as raw uint16 and computes on it wrongly): no bf16
    # value goes through Triton arithmetic here, in the interpreter or compiled. A same-dtype
    # append moves raw integers, and an fp8 append widens bf16 bits to fp32 by a shift (_to_fp32),
    # which is exact in both modes; so the wrapper needs no fp32 copy of bf16 inputs.
    fp8_consts = {}
    if k_cache.dtype in _FP8:
        fp8_consts = dict(FP8FMT=_FP8_FORMAT[k_cache.dtype])
        src = _QUANT_SOURCES[k.dtype]
        k_in, v_in = (k.view(torch.int16), v.view(torch.int16)) if src == _BF16 else (k, v)
        kc, vc = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
        ks, vs = k_scale, v_scale
    else:
        src = _COPY
        k_in, v_in, kc, vc = _raw(k), _raw(v), _raw(k_cache), _raw(v_cache)
        ks = vs = seqlens if seqlens is not None else slots  # unused placeholders
    dummy = seqlens if seqlens is not None else slots
    cos = sin = positions = None
    rotary_consts = {}
    if rotary is not None:
        cos, sin, interleaved, positions = rotary
        # the rotated key is read as values (bf16 as its int16 bits, widened by a shift), whatever the cache
        k_in = k.view(torch.int16) if k.dtype == torch.bfloat16 else k
        if cos.dtype == torch.bfloat16:
            cos, sin = cos.view(torch.int16), sin.view(torch.int16)
        rotary_consts = dict(ROTARY=_GPTJ if interleaved else _NEOX, KFLOAT=_FLOAT_KINDS[k.dtype],
                             COSFLOAT=_FLOAT_KINDS[rotary[0].dtype], EXACT_RN=not INTERPRET)
    block_d = triton.next_power_of_2(d)
    block_h = min(triton.next_power_of_2(hkv), max(1, _MAX_TILE // block_d))
    grid = (B * s_new, triton.cdiv(hkv, block_h))
    args = (
        k_in, v_in, kc, vc,
        seqlens if seqlens is not None else dummy,
        block_table if block_table is not None else dummy,
        slots if slots is not None else dummy,
        cu_seqlens if cu_seqlens is not None else dummy,
        ks, vs,
        cos if cos is not None else dummy, sin if sin is not None else dummy,
        positions if positions is not None else dummy,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        seqlens.stride(0) if seqlens is not None else 0,
        block_table.stride(0) if block_table is not None else 0,
        block_table.stride(1) if block_table is not None else 0,
        slots.stride(0) if slots is not None else 0,
        ks.stride(0) if src != _COPY else 0, vs.stride(0) if src != _COPY else 0,
        cu_seqlens.stride(0) if cu_seqlens is not None else 0,
        cos.stride(0) if cos is not None else 0, sin.stride(0) if sin is not None else 0,
        positions.stride(0) if positions is not None else 0,
        s_new, k_cache.shape[0], k_cache.shape[1],
        block_table.shape[1] if block_table is not None else 0, hkv, d,
        num_seqs, max(num_seqs - 1, 0).bit_length(),  # ceil(log2 B) binary-search steps
        cos.shape[0] if cos is not None else 0, cos.shape[1] if cos is not None else 0,
    )
    # Warps such that every thread holds at least one 16-byte vector of the source tile: with more
    # threads than vectors a thread's share shrinks below 128 bits and the loads narrow with it
    # (a [2, 128] fp16 tile over 4 warps is 2 elements a thread). Up to 4 warps.
    vec = max(1, 16 // k_in.element_size())
    num_warps = max(1, min(4, block_h * block_d // (32 * vec)))
    return Launch(_append_kernel, lambda _: grid, args, dict(MODE=mode, SRC=src, RAGGED=cu_seqlens is not None,
                                                          BLOCK_H=block_h, BLOCK_D=block_d, **rotary_consts,
                                                          **fp8_consts),
                  (KernelConfig((), num_warps=num_warps, num_stages=1),), name="append")


def _launch(*args) -> None:
    launch = plan(*args)
    if launch is not None:
        launch.run()


def append(k, v, k_cache, v_cache, cache_seqlens, block_table, k_scale, v_scale, cu_seqlens=None,
           rotary_cos=None, rotary_sin=None, rotary_interleaved=False) -> None:
    """k/v [B, S_new, Hkv, D], or ragged [T, Hkv, D] with cu_seqlens int32 [B + 1]; caches [B, S_max, Hkv, D]
    or paged [pages, page_size, Hkv, D] with block_table int32 [B, max_pages]; cache_seqlens int32 [B];
    k_scale/v_scale fp32 [Hkv] (fp8); rotary_cos/rotary_sin [max_position, rotary_dim / 2] (keys rotated
    at cache_seqlens[b] + i)."""
    mode = _CONTIGUOUS if block_table is None else _PAGED
    if cu_seqlens is not None:
        k, v = k.unsqueeze(1), v.unsqueeze(1)  # [T, 1, Hkv, D]: program t reads source row t
    rotary = None if rotary_cos is None else (rotary_cos, rotary_sin, rotary_interleaved, None)
    _launch(k, v, k_cache, v_cache, mode, cache_seqlens, block_table, None, k_scale, v_scale, cu_seqlens, rotary)


def append_slots(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale, positions=None, rotary_cos=None,
                 rotary_sin=None, rotary_interleaved=False) -> None:
    """k/v [T, Hkv, D]; caches [pages, page_size, Hkv, D]; slot_mapping int32/int64 [T], s < 0 skipped;
    rotary: key t rotated at positions[t] (int32/int64 [T])."""
    k4 = k.unsqueeze(1)  # [T, 1, Hkv, D]: slots are the paged mode with one token per "sequence"
    v4 = v.unsqueeze(1)
    rotary = None if rotary_cos is None else (rotary_cos, rotary_sin, rotary_interleaved, positions)
    _launch(k4, v4, k_cache, v_cache, _SLOTS, None, None, slot_mapping, k_scale, v_scale, None, rotary)

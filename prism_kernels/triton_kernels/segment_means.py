"""Segment means in Triton (docs/method.md, "Segment means"; paper Alg. 2, Eq. 8-9).

x [..., n, D] is cut along dim -2 into m contiguous segments with
torch.tensor_split sizes (the first n mod m hold one more token); each segment's
column mean is accumulated in fp32 and written in x's dtype.

It is a pure streaming reduction, so the kernel is bandwidth-bound: one program
owns (row-group l, segment s, a BLOCK_D slice of D) and sums BLOCK_R x BLOCK_D
tiles into a 2-D fp32 register accumulator (reduced once at the end). When that
grid is too small to fill the GPU (few long segments, e.g. m = 1 at 32k tokens),
each segment is also split along its rows into SPLIT chunks whose fp32 partial
sums go to a small workspace, summed and divided afterwards.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit(do_not_specialize=["n", "m", "base", "rem", "rows_per_split"])
def _segment_means_kernel(
    X, Out, Ws,
    stride_xl, stride_xn, stride_xd,
    stride_ol, stride_om, stride_od,
    n, m, D, base, rem, rows_per_split,
    SPLIT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)           # l * m + s
    pid_d = tl.program_id(1)
    pid_k = tl.program_id(2)         # row chunk of the segment (SPLIT > 1)
    l = (pid // m).to(tl.int64)
    s = pid % m
    seg_start = s * base + tl.minimum(s, rem)
    seg_len = base + (s < rem).to(tl.int32)
    if SPLIT > 1:
        r0 = pid_k * rows_per_split
        r1 = tl.minimum(r0 + rows_per_split, seg_len)
    else:
        r0 = 0
        r1 = seg_len

    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_valid = offs_d < D
    offs_r = tl.arange(0, BLOCK_R)
    x_base = X + l * stride_xl + offs_d[None, :] * stride_xd
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for r in range(r0, r1, BLOCK_R):
        rows = r + offs_r
        mask = (rows < r1)[:, None] & d_valid[None, :]
        ptrs = x_base + (seg_start + rows).to(tl.int64)[:, None] * stride_xn
        acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    total = tl.sum(acc, axis=0)
    if SPLIT > 1:
        # workspace [SPLIT, L * m, D] fp32, contiguous
        w_ptrs = Ws + (pid_k.to(tl.int64) * tl.num_programs(0) + pid) * D + offs_d
        tl.store(w_ptrs, total, mask=d_valid)
    else:
        mean = total / seg_len.to(tl.float32)
        o_ptrs = Out + l * stride_ol + s * stride_om + offs_d * stride_od
        tl.store(o_ptrs, mean.to(Out.dtype.element_ty), mask=d_valid)


_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


def _num_sms(device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def segment_means_triton(x: torch.Tensor, num_segments: int):
    """Kernel form of prism::segment_means: (means [..., m, D] in x's dtype, counts int64 [m])."""
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError("x must be a tensor of shape [..., n, D] (at least 2-D)")
    if x.dtype not in _SUPPORTED:
        raise ValueError(
            f"the Triton segment_means kernel supports float32, float16 and bfloat16, got "
            f"{x.dtype}; use backend='cpp' or 'torch' for float64")
    n, D = x.shape[-2], x.shape[-1]
    m = int(num_segments)
    if not 1 <= m <= n:
        raise ValueError(f"num_segments must satisfy 1 <= num_segments <= n (n = {n}), got {m}")
    lead = x.shape[:-2]
    # [L, n, D] view (reshape copies only when the leading dims cannot be merged)
    x3 = x.reshape(-1, n, D) if x.dim() != 3 else x
    L = x3.shape[0]
    base, rem = divmod(n, m)
    out = torch.empty((L, m, D), dtype=x.dtype, device=x.device)
    counts = (torch.arange(m, device=x.device) < rem).to(torch.int64) + base

    if INTERPRET:
        block_r, block_d, warps = 16, min(64, max(16, triton.next_power_of_2(D))), 1
    else:
        block_d = min(256 if x.element_size() == 2 else 128, max(16, triton.next_power_of_2(D)))
        block_r, warps = 32, 8 if block_d >= 128 else 4
    n_d = triton.cdiv(D, block_d)
    programs = L * m * n_d
    split = 1
    target = 4 * _num_sms(x.device)
    seg_max = base + (1 if rem else 0)
    if not INTERPRET and programs < target and seg_max >= 4 * block_r:
        split = min(triton.cdiv(target, programs), triton.cdiv(seg_max, 2 * block_r), 256)
    rows_per_split = triton.cdiv(seg_max, split)
    rows_per_split = triton.cdiv(rows_per_split, block_r) * block_r
    split = triton.cdiv(seg_max, rows_per_split)
    ws = torch.empty((split, L * m, D), dtype=torch.float32, device=x.device) if split > 1 else out

    grid = (L * m, n_d, split)
    launch = dict(SPLIT=split, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps)
    args = (x3, out, ws, *x3.stride(), *out.stride(), n, m, D, base, rem, rows_per_split)
    if x.device.type == "cuda":
        with torch.cuda.device(x.device):
            _segment_means_kernel[grid](*args, **launch)
    else:
        _segment_means_kernel[grid](*args, **launch)
    if split > 1:
        sums = ws.sum(dim=0).view(L, m, D)
        out = (sums / counts.to(torch.float32)[None, :, None]).to(x.dtype)
    return out.reshape(*lead, m, D), counts

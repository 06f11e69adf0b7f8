"""Triton attention-state merge: exact log-sum-exp combine of partial attention outputs.

O = sum_i exp(L_i - L) O_i with L = logsumexp_i(L_i). A part with L_i = -inf contributes
nothing (its O_i is never read into the sum); if every part is -inf, O = 0 and L = -inf.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _merge_kernel(
    outs_ptr,
    lses_ptr,
    out_ptr,
    lse_ptr,
    num_parts,
    stride_on,
    stride_or,
    stride_ln,
    stride_lr,
    stride_out_r,
    head_dim,
    WRITE_LSE: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dmask = d < head_dim
    m = tl.full([], float("-inf"), tl.float32)
    for i in range(num_parts):
        m = tl.maximum(m, tl.load(lses_ptr + i * stride_ln + r * stride_lr).to(tl.float32))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    denom = tl.full([], 0.0, tl.float32)
    for i in range(num_parts):
        w = tl.exp(tl.load(lses_ptr + i * stride_ln + r * stride_lr).to(tl.float32) - m_safe)
        o = tl.load(outs_ptr + i * stride_on + r * stride_or + d, mask=dmask, other=0.0)
        acc += tl.where(w > 0.0, w * o.to(tl.float32), 0.0)
        denom += w
    nonempty = denom > 0.0
    out = tl.where(nonempty, acc / tl.where(nonempty, denom, 1.0), 0.0)
    tl.store(out_ptr + r * stride_out_r + d, out.to(out_ptr.dtype.element_ty), mask=dmask)
    if WRITE_LSE:
        lse = tl.where(nonempty, m_safe + tl.log(tl.where(nonempty, denom, 1.0)), float("-inf"))
        tl.store(lse_ptr + r, lse)


def merge_attn_states_into(
    outs: torch.Tensor, lses: torch.Tensor, out: torch.Tensor, lse: torch.Tensor | None
) -> None:
    """Merge outs [N, R, D] / lses [N, R] into out [R, D] (any float dtype) and lse [R] fp32."""
    num_parts, rows, head_dim = outs.shape
    if rows == 0:
        return
    assert outs.stride(-1) == 1 and out.stride(-1) == 1
    _merge_kernel[(rows,)](
        outs,
        lses,
        out,
        lse if lse is not None else out,
        num_parts,
        outs.stride(0),
        outs.stride(1),
        lses.stride(0),
        lses.stride(1),
        out.stride(0),
        head_dim,
        WRITE_LSE=lse is not None,
        BLOCK_D=triton.next_power_of_2(head_dim),
    )


def merge_attn_states(
    outs: torch.Tensor,
    lses: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine N partial states: outs [N, ..., Hq, D], lses [N, ..., Hq] -> (out, lse fp32)."""
    num_parts, head_dim = outs.shape[0], outs.shape[-1]
    outs3 = outs.reshape(num_parts, -1, head_dim)
    if outs3.stride(-1) != 1:
        outs3 = outs3.contiguous()
    lses2 = lses.reshape(num_parts, -1)
    if out is None:
        out = torch.empty(outs.shape[1:], dtype=outs.dtype, device=outs.device)
    if lse is None:
        lse = torch.empty(lses.shape[1:], dtype=torch.float32, device=lses.device)
    merge_attn_states_into(outs3, lses2, out.view(-1, head_dim), lse.view(-1))
    return out, lse

"""SwiGLU's activation in one pass: ``silu(gate) * up`` from the fused gate/up projection.

Unfused, torch reads the halves through strided views in two elementwise kernels (silu, then
the product) and writes an intermediate; this reads each half once and writes the result once.
Rounding follows the reference: silu rounded to the input dtype before the product.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, width, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + width + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``x [..., 2 * I]`` (gate then up) -> ``silu(gate) * up`` of shape ``[..., I]``."""
    width = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(*x.shape[:-1], width, dtype=x.dtype, device=x.device)
    rows = x2.shape[0]
    if rows:
        block = 1024
        _silu_and_mul_kernel[(rows, triton.cdiv(width, block))](
            x2, out.view(-1, width), x2.stride(0), width, width, BLOCK=block, num_warps=4
        )
    return out

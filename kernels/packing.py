"""Two signed 4-bit codes per byte, the layout every 4-bit tensor in ``kernels/`` uses.

Packing runs along the last dimension (the reduction dimension K of a GEMM operand, the channels C of an
activation): element 2j goes to the low nibble and element 2j+1 to the high nibble of byte j, each as a
4-bit two's complement value (−8 … 7; our codes stay in ±7). Bytes are stored as ``torch.uint8``. This is the
nibble order of the released CUTLASS packer, so weights packed there read the same here.

Keeping the even elements in the low nibbles lets a kernel unpack with two shifts and use the even and the
odd halves as two separate dot products, without interleaving registers (see ``mixed_gemm``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Integer codes in [−8, 7] (…, K) with K even → bytes (…, K/2): low nibble = even element."""
    if codes.shape[-1] % 2:
        raise ValueError(f"packing two codes per byte needs an even last dimension, got {codes.shape[-1]}")
    if codes.numel() and (codes.min() < -8 or codes.max() > 7):
        raise ValueError("int4 codes must lie in [-8, 7]")
    nibbles = codes.to(torch.int16) & 0xF
    return (nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Bytes (…, K/2) → int8 codes (…, K), the inverse of ``pack_int4``."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed int4 tensors are uint8, got {packed.dtype}")
    wide = packed.to(torch.int16)
    low = ((wide & 0xF) ^ 8) - 8  # sign-extend the nibble
    high = ((wide >> 4) ^ 8) - 8
    return torch.stack([low, high], dim=-1).flatten(-2).to(torch.int8)


@triton.jit
def unpack_int4_halves(packed):
    """uint8 tile → (even elements, odd elements) as int8 tiles of the same shape, by arithmetic shifts."""
    wide = packed.to(tl.int32)
    low = (wide << 28) >> 28
    high = (wide << 24) >> 28
    return low.to(tl.int8), high.to(tl.int8)

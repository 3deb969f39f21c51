"""Host-side arithmetic of the launchers, on plain Python ints.

``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions: called from host code each goes through a
wrapper that imports and unwraps its arguments, microseconds a call, paid on every launch (a packed Vim-B
forward makes ~620: 26 a layer, and eager PyTorch waits on the host). These are the same functions without the wrapper.
"""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for positive b."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ≥ n, for n ≥ 1."""
    return 1 << (n - 1).bit_length()

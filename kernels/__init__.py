"""Triton kernels for quantized Vision Mamba inference; each module pairs a kernel with its PyTorch reference.

Depends on torch and triton only. Import the modules themselves (``kernels.detect_quant``, ``kernels.mixed_gemm``,
``kernels.selective_scan``).
"""

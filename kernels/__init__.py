"""Triton kernels for quantized Vision Mamba inference; each module pairs a kernel with its PyTorch reference.

Depends on torch and triton only. Import the modules themselves (``kernels.detect_quant``, ``kernels.mixed_gemm``,
``kernels.selective_scan``, and the fused producers ``kernels.norm_detect_quant``, ``kernels.conv_silu``,
``kernels.merge_detect_quant``).
"""

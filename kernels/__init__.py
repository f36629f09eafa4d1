"""Triton kernels, one module per op; installed as `duodiff_fast.kernels`."""

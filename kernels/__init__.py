"""Kernels: Triton kernels, each with a plain-torch reference."""

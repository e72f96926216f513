"""Kernels behind two seams: paged attention and the decoder's fused elementwise ops.

Each seam has a base with its plain-torch reference (``attention``, ``fused_ops``) and backends
that implement it (Triton on CUDA; the CPU kernels' native decoder on x86); ``backends`` picks
one at start-up. A backend imports its base, never the reverse.
"""

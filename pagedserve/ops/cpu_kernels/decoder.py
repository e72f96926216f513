"""The native decoder: every layer of a step of a Llama-family model in one call
(``Decoder`` in ``csrc/kernels.cpp``: norms, rotary, the paged KV write and attention, SwiGLU,
residual adds in float32, the matmuls on Q4_1 tiles), where the same step op by op dispatched
~5,000 torch ops.

Each of T rows is a token: a query over the positions up to its own (decodes, and prompt
tokens alike, causal attention row by row), with its K and V written to its slot before any
row attends. Its result does not depend on the other rows of the step.
"""

from __future__ import annotations

import ctypes
import weakref
from dataclasses import dataclass

import torch

from pagedserve.ops.cpu_kernels.library import CACHE_DTYPES, DecoderDims, KernelLibrary, Layer, Step


@dataclass(slots=True)
class LayerWeights:
    """One layer as the decoder takes it (kernels.h's ps_layer). H hidden, I intermediate,
    Q = (nh + 2 nkv) hd, C the tile's columns; the tiles from packing.pack."""

    input_norm: torch.Tensor  # (H,) float32
    qkv: torch.Tensor  # Q4 tiles of the fused q/k/v projection, (Q / C, H / 32, bytes)
    qkv_bias: torch.Tensor | None  # (Q,) float32 (Qwen2), or None
    o: torch.Tensor  # (H / C, nh hd / 32, bytes)
    post_norm: torch.Tensor  # (H,) float32
    gate_up: torch.Tensor  # (2 I / C, H / 32, bytes), [gate | up]
    down: torch.Tensor  # (H / C, I / 32, bytes)


def _check(name: str, t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if t.dtype != dtype or tuple(t.shape) != shape or not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous {dtype} {shape}, got {t.dtype} "
                         f"{tuple(t.shape)}")


def _int32_rows(name: str, t: torch.Tensor, rows: int) -> None:
    if t.dtype != torch.int32 or t.dim() != 1 or t.shape[0] < rows or t.stride(0) != 1:
        raise ValueError(f"{name} must be int32 ({rows},) of unit stride")


class Decoder:
    def __init__(self, library: KernelLibrary, layers: list[LayerWeights], cos: torch.Tensor,
                 sin: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                 eps: float):
        """cos, sin (max positions, hd / 2): the rotary tables of pagedserve/models/llama.py."""
        if not layers:
            raise ValueError("layers must not be empty")
        g = library.geometry
        hidden = layers[0].input_norm.numel()
        intermediate = layers[0].gate_up.shape[0] * g.tile_columns // 2
        q_width = (num_heads + 2 * num_kv_heads) * head_dim

        def tiles(n: int, k: int) -> tuple[int, int, int]:
            return (n // g.tile_columns, k // g.group, g.q4_tile_bytes)

        for i, layer in enumerate(layers):
            _check(f"layer {i} input_norm", layer.input_norm, torch.float32, (hidden,))
            _check(f"layer {i} post_norm", layer.post_norm, torch.float32, (hidden,))
            _check(f"layer {i} qkv", layer.qkv, torch.uint8, tiles(q_width, hidden))
            _check(f"layer {i} o", layer.o, torch.uint8, tiles(hidden, num_heads * head_dim))
            _check(f"layer {i} gate_up", layer.gate_up, torch.uint8,
                   tiles(2 * intermediate, hidden))
            _check(f"layer {i} down", layer.down, torch.uint8, tiles(hidden, intermediate))
            if layer.qkv_bias is not None:
                _check(f"layer {i} qkv_bias", layer.qkv_bias, torch.float32, (q_width,))
        self.cos, self.sin = cos.float().contiguous(), sin.float().contiguous()
        _check("cos", self.cos, torch.float32, (self.cos.shape[0], head_dim // 2))
        _check("sin", self.sin, torch.float32, tuple(self.cos.shape))

        def pointer(t: torch.Tensor | None) -> int | None:
            return None if t is None else t.data_ptr()

        self._layers = layers  # the tensors stay alive as long as the decoder
        structs = (Layer * len(layers))(*[
            Layer(*[pointer(getattr(layer, name)) for name, _ in Layer._fields_])
            for layer in layers])
        self._structs = structs
        self.dims = DecoderDims(len(layers), hidden, intermediate, num_heads, num_kv_heads,
                                head_dim, self.cos.shape[0], eps)
        self._library = library
        self._handle = library.decoder_new(self.dims, structs, self.cos, self.sin)
        weakref.finalize(self, library.decoder_free, self._handle)
        self._caches: tuple[list[torch.Tensor], ctypes.Array] | None = None

    def _cache_pointers(self, caches: list[torch.Tensor]) -> ctypes.Array:
        """The caches' data pointers, checked once for a given list of tensors."""
        if self._caches is not None and len(caches) == len(self._caches[0]) and all(
                a is b for a, b in zip(caches, self._caches[0], strict=True)):
            return self._caches[1]
        d = self.dims
        if len(caches) != 2 * d.num_layers:
            raise ValueError(f"caches: a K and a V cache per layer, {2 * d.num_layers}, got "
                             f"{len(caches)}")
        first = caches[0]
        shape = (first.shape[0], first.shape[1], d.num_kv_heads, d.head_dim)
        if first.dtype not in CACHE_DTYPES:
            raise ValueError(f"caches must be float32 or float16, got {first.dtype}")
        for i, cache in enumerate(caches):
            _check(f"cache {i}", cache, first.dtype, shape)
        pointers = (ctypes.c_void_p * len(caches))(*[c.data_ptr() for c in caches])
        self._caches = (list(caches), pointers)
        return pointers

    def forward(self, x: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                seq_lens: torch.Tensor, block_tables: torch.Tensor,
                caches: list[torch.Tensor]) -> torch.Tensor:
        """x (T, H) float32, the embedded tokens, becomes the residual stream after the last
        layer (before the final norm), in place, and is returned. positions, slots, seq_lens
        (T,) int32; block_tables (T, >= blocks of the longest) int32 with rows of unit stride;
        caches: per layer its K and V. Raises KernelError (nothing computed) for a position,
        slot or block that does not fit the caches."""
        rows = x.shape[0]
        _check("x", x, torch.float32, (rows, self.dims.hidden))
        for name, t in (("positions", positions), ("slots", slots), ("seq_lens", seq_lens)):
            _int32_rows(name, t, rows)
        if (block_tables.dtype != torch.int32 or block_tables.dim() != 2
                or block_tables.shape[0] < rows or block_tables.stride(1) != 1):
            raise ValueError("block_tables must be int32 (T, W) with rows of unit stride")
        pointers = self._cache_pointers(caches)
        step = Step(rows, positions.data_ptr(), slots.data_ptr(), seq_lens.data_ptr(),
                    block_tables.data_ptr(), block_tables.stride(0), block_tables.shape[1],
                    ctypes.cast(pointers, ctypes.c_void_p), len(caches),
                    CACHE_DTYPES[caches[0].dtype], caches[0].shape[0], caches[0].shape[1])
        self._library.decoder_forward(self._handle, x, step)
        return x

"""Weights into the kernels' tiles, and back (for tests): ``csrc/kernels.h`` draws the layout,
and the numbers come from the loaded library (:class:`~.library.Geometry`), not from here.

int4: every group of 32 weights along k as lo + d * q with q in 0..15, min/max-quantized like a
Q4_1 GGUF block (so exact for weights that came from Q4_1 blocks, whose d and lo are float16
already); int8 (the LM head): d * q with q in -127..127, d = max|w| / 127 (llama.cpp's Q8_0
grid, exact for Q8_0 blocks). With C columns a tile (16):

    Q4 tile of a group:  [d: C float16][lo: C float16][4 vectors of 4C bytes]
                         vector v byte 4c + i: q[c][8v + i] | q[c][8v + 4 + i] << 4
    Q8 tile of a group:  [d: C float16][8 vectors of 4C bytes]
                         vector j byte 4c + i: q[c][4j + i]
"""

from __future__ import annotations

import torch

from pagedserve.ops.cpu_kernels.library import Geometry


def int4_grid(weight: torch.Tensor, group: int = 32
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float32 weight -> q (N, K/group, group) in 0..15, d and lo (N, K/group): each
    group along K as lo + d * q, min/max-quantized like a Q4_0/Q4_1 GGUF block. Both int4
    copies of ``Linear`` (these kernels' and torch's) use this grid."""
    n, k = weight.shape
    if k % group:
        raise ValueError(f"the input dimension ({k}) must be a multiple of {group}")
    groups = weight.view(n, k // group, group)
    lo, hi = groups.amin(-1), groups.amax(-1)
    d = ((hi - lo) / 15).clamp(min=1e-12)
    q = ((groups - lo[..., None]) / d[..., None]).round().clamp(0, 15)
    return q, d, lo


def _check_shape(n: int, k: int, g: Geometry) -> None:
    if k % g.group or n % g.tile_columns:
        raise ValueError(f"the weight's shape {(n, k)} must be a multiple of "
                         f"({g.tile_columns}, {g.group})")


def _scales(values: torch.Tensor, tiles: int, g: Geometry) -> torch.Tensor:
    """(N, G) -> (tiles, G, 2C) uint8: each group's C float16, column order."""
    return (values.half().view(tiles, g.tile_columns, -1).transpose(1, 2).contiguous()
            .view(torch.uint8))


def pack(weight: torch.Tensor, g: Geometry) -> torch.Tensor:
    """(N, K) weight -> (N/C, K/32, q4_tile_bytes) uint8 Q4_1 tiles on :func:`int4_grid`."""
    n, k = weight.shape
    _check_shape(n, k, g)
    q, d, lo = int4_grid(weight.float(), g.group)
    tiles, groups, c = n // g.tile_columns, k // g.group, g.tile_columns
    # (tiles, C columns, groups, 4 vectors, 2 nibbles, 4 positions) -> (tiles, groups, v, c, i)
    q = q.to(torch.uint8).view(tiles, c, groups, 4, 2, 4).permute(0, 2, 3, 1, 4, 5)
    nibbles = (q[..., 0, :] | (q[..., 1, :] << 4)).reshape(tiles, groups, 16 * c)
    return torch.cat([_scales(d, tiles, g), _scales(lo, tiles, g), nibbles], -1).contiguous()


def unpack(blocks: torch.Tensor, g: Geometry
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`pack`'s tiles -> q (N, G, 32) in 0..15, d and lo (N, G) float32."""
    tiles, groups, _ = blocks.shape
    c = g.tile_columns
    d, lo = (blocks[..., a : a + 2 * c].contiguous().view(torch.float16).float()
             .transpose(1, 2).reshape(tiles * c, groups) for a in (0, 2 * c))
    nibbles = blocks[..., 4 * c :].reshape(tiles, groups, 4, c, 4)  # (tile, g, v, c, i)
    q = torch.stack([nibbles & 0x0F, nibbles >> 4], 4)  # (tile, g, v, c, 2, i)
    q = q.permute(0, 3, 1, 2, 4, 5).reshape(tiles * c, groups, 32)
    return q, d, lo


def pack_q8(weight: torch.Tensor, g: Geometry) -> torch.Tensor:
    """(N, K) weight -> (N/C, K/32, q8_tile_bytes) uint8 Q8_0 tiles."""
    n, k = weight.shape
    _check_shape(n, k, g)
    tiles, groups, c = n // g.tile_columns, k // g.group, g.tile_columns
    values = weight.float().view(n, groups, g.group)
    d = (values.abs().amax(-1) / 127).half()
    inverse = torch.where(d > 0, 1 / d.float(), 0.0)
    q = (values * inverse[..., None]).round().clamp(-127, 127).to(torch.int8)
    # (tiles, C columns, groups, 8 vectors, 4 positions) -> (tiles, groups, j, c, i)
    q = q.view(tiles, c, groups, 8, 4).permute(0, 2, 3, 1, 4).reshape(tiles, groups, 32 * c)
    return torch.cat([_scales(d.float(), tiles, g), q.view(torch.uint8)], -1).contiguous()


def unpack_q8(blocks: torch.Tensor, g: Geometry) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pack_q8`'s tiles -> q (N, G, 32) int8, d (N, G) float32."""
    tiles, groups, _ = blocks.shape
    c = g.tile_columns
    d = blocks[..., : 2 * c].contiguous().view(torch.float16).float().transpose(1, 2)
    q = blocks[..., 2 * c :].contiguous().view(torch.int8).reshape(tiles, groups, 8, c, 4)
    q = q.permute(0, 3, 1, 2, 4).reshape(tiles * c, groups, 32)
    return q, d.reshape(tiles * c, groups)

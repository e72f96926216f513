"""One compiled variant of the CPU kernels, loaded with ctypes: its C interface
(``csrc/kernels.h``) as Python calls on tensors.

The library links no torch and no Python; tensors cross as data pointers (every call checks
dtype, shape and contiguity first), and ctypes releases the GIL for the call, so the server's
other threads run meanwhile. The structs of kernels.h have mirrors here whose sizes are checked
against the library's own (``ps_get_geometry``) at load: a library of another ABI is refused,
not misread.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from pagedserve.ops.cpu_kernels import build, isa

logger = logging.getLogger(__name__)

ABI_VERSION = 1
_p = ctypes.c_void_p
_i64 = ctypes.c_int64


class KernelUnavailable(RuntimeError):
    """No usable kernel library (the message says why); torch's kernels serve instead."""


class KernelError(RuntimeError):
    """A kernel refused its inputs (the library's message); nothing was computed."""


class _Geometry(ctypes.Structure):
    _fields_ = [("abi_version", ctypes.c_int32), ("group", ctypes.c_int32),
                ("tile_columns", ctypes.c_int32), ("q4_tile_bytes", ctypes.c_int32),
                ("q8_tile_bytes", ctypes.c_int32), ("layer_bytes", ctypes.c_int32),
                ("step_bytes", ctypes.c_int32)]


class Layer(ctypes.Structure):
    """kernels.h's ps_layer: one decoder layer's weights by name."""

    _fields_ = [("input_norm", _p), ("qkv", _p), ("qkv_bias", _p), ("o", _p),
                ("post_norm", _p), ("gate_up", _p), ("down", _p)]


class DecoderDims(ctypes.Structure):
    _fields_ = [("num_layers", _i64), ("hidden", _i64), ("intermediate", _i64),
                ("num_heads", _i64), ("num_kv_heads", _i64), ("head_dim", _i64),
                ("max_positions", _i64), ("eps", ctypes.c_double)]


class Step(ctypes.Structure):
    _fields_ = [("rows", _i64), ("positions", _p), ("slots", _p), ("seq_lens", _p),
                ("block_tables", _p), ("table_stride", _i64), ("table_width", _i64),
                ("caches", _p), ("num_caches", _i64), ("cache_dtype", ctypes.c_int32),
                ("num_blocks", _i64), ("block_size", _i64)]


CACHE_DTYPES = {torch.float32: 0, torch.float16: 1}  # kernels.h's PS_CACHE_*


@dataclass(frozen=True, slots=True)
class Geometry:
    """The tiles' shape, as the library reports it (kernels.h is its one definition)."""

    group: int  # weights and activations quantized in groups of this many along k
    tile_columns: int  # output columns per tile
    q4_tile_bytes: int  # bytes of one Q4_1 tile of one group
    q8_tile_bytes: int  # bytes of one Q8_0 tile of one group


def _declare(lib: ctypes.CDLL) -> None:
    signatures = {
        "ps_get_geometry": (None, [ctypes.POINTER(_Geometry)]),
        "ps_isa": (ctypes.c_char_p, []),
        "ps_source_hash": (ctypes.c_char_p, []),
        "ps_last_error": (ctypes.c_char_p, []),
        "ps_selftest": (ctypes.c_int, []),
        "ps_set_threads": (None, [ctypes.c_int32]),
        "ps_threads": (ctypes.c_int32, []),
        "ps_set_spin_us": (None, [ctypes.c_int32]),
        "ps_parallel_threads": (ctypes.c_int32, [_i64]),
        "ps_rows_max": (ctypes.c_int, [_p, _i64, _i64, _p, _p]),
        "ps_q4_matmul": (ctypes.c_int, [_p, _i64, _i64, _p, _i64, _p]),
        "ps_q8_matmul": (ctypes.c_int, [_p, _i64, _i64, _p, _i64, _p]),
        "ps_decoder_new": (_p, [ctypes.POINTER(DecoderDims), ctypes.POINTER(Layer), _p, _p]),
        "ps_decoder_free": (None, [_p]),
        "ps_decoder_forward": (ctypes.c_int, [_p, _p, ctypes.POINTER(Step)]),
    }
    for name, (restype, argtypes) in signatures.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, argtypes


class KernelLibrary:
    """A variant's library, loaded and checked (ABI, sizes, sources); not yet self-tested."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._lib = ctypes.CDLL(str(path))
            _declare(self._lib)
        except (OSError, AttributeError) as exc:
            raise KernelUnavailable(f"{path.name} did not load: {exc}") from exc
        g = _Geometry()
        self._lib.ps_get_geometry(ctypes.byref(g))
        if (g.abi_version, g.layer_bytes, g.step_bytes) != (
                ABI_VERSION, ctypes.sizeof(Layer), ctypes.sizeof(Step)):
            raise KernelUnavailable(f"{path.name} has another interface (ABI {g.abi_version})")
        self.geometry = Geometry(g.group, g.tile_columns, g.q4_tile_bytes, g.q8_tile_bytes)
        # what packing.py writes: Q4_1 is 20 bytes a column of 32 weights, Q8_0 34
        if (g.group, g.q4_tile_bytes, g.q8_tile_bytes) != (32, 20 * g.tile_columns,
                                                           34 * g.tile_columns):
            raise KernelUnavailable(f"{path.name}'s tiles are not the layout packing.py writes")
        self.isa = self._lib.ps_isa().decode()
        self.source_hash = self._lib.ps_source_hash().decode()
        if self.source_hash != build.source_hash():
            raise isa.StaleLibrary(f"{path} was built from other sources "
                                   f"({self.source_hash}, these are {build.source_hash()})")

    def selftest(self, probe: isa.Probe) -> int:
        """0 where the kernels compute their fixed examples right on this CPU; else the failed
        check's number, or -1000 - a signal's (SIGILL: the OS or CPU refused an instruction)."""
        return probe.run_guarded(self._lib.ps_selftest)

    # --- threads -------------------------------------------------------------------------

    def set_threads(self, threads: int) -> None:
        self._lib.ps_set_threads(threads)

    @property
    def threads(self) -> int:
        return self._lib.ps_threads()

    def set_spin_us(self, microseconds: int) -> None:
        """How long an idle worker spins before it blocks (``PAGEDSERVE_SPIN_US``)."""
        self._lib.ps_set_spin_us(microseconds)

    def parallel_threads(self, tasks: int) -> int:
        """Threads that took part in a loop of `tasks` items (a test that the pool runs)."""
        return self._lib.ps_parallel_threads(tasks)

    # --- the greedy rows' choice -----------------------------------------------------------

    def rows_max(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, V) float32 -> (values (B,), indices (B,) int64): torch.max(x, dim=-1) on the
        kernels' pool (torch's reduction takes one thread's time over a batch's logits); a row
        holding NaN gives NaN."""
        if x.dim() != 2 or x.dtype != torch.float32 or x.device.type != "cpu":
            raise ValueError(f"x must be a float32 CPU matrix, got {x.dtype} {tuple(x.shape)}")
        x = x.contiguous()
        values = torch.empty(x.shape[0], dtype=torch.float32)
        indices = torch.empty(x.shape[0], dtype=torch.int64)
        if self._lib.ps_rows_max(x.data_ptr(), x.shape[0], x.shape[1], values.data_ptr(),
                                 indices.data_ptr()) != 0:
            raise KernelError(self._lib.ps_last_error().decode())
        return values, indices

    # --- matmuls -------------------------------------------------------------------------

    def _matmul(self, function, x: torch.Tensor, blocks: torch.Tensor, tile_bytes: int
                ) -> torch.Tensor:
        x = x.float().contiguous()
        g = self.geometry
        if x.dim() != 2:
            raise ValueError(f"x must be a matrix, got shape {tuple(x.shape)}")
        if (blocks.dim() != 3 or blocks.shape[2] != tile_bytes or blocks.dtype != torch.uint8
                or not blocks.is_contiguous()):
            raise ValueError(f"blocks must be contiguous uint8 (N/{g.tile_columns}, "
                             f"K/{g.group}, {tile_bytes}), got {tuple(blocks.shape)}")
        if x.shape[1] != blocks.shape[1] * g.group:
            raise ValueError(f"x has {x.shape[1]} columns, the weights "
                             f"{blocks.shape[1] * g.group}")
        n = blocks.shape[0] * g.tile_columns
        out = torch.empty(x.shape[0], n, dtype=torch.float32)
        if function(x.data_ptr(), x.shape[0], x.shape[1], blocks.data_ptr(), n,
                    out.data_ptr()) != 0:
            raise KernelError(self._lib.ps_last_error().decode())
        return out

    def q4_matmul(self, x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """x (M, K) -> (M, N) float32, W in Q4_1 tiles (packing.pack)."""
        return self._matmul(self._lib.ps_q4_matmul, x, blocks, self.geometry.q4_tile_bytes)

    def q8_matmul(self, x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """x (M, K) -> (M, N) float32, W in Q8_0 tiles (packing.pack_q8)."""
        return self._matmul(self._lib.ps_q8_matmul, x, blocks, self.geometry.q8_tile_bytes)

    # --- the decoder (decoder.py wraps these) --------------------------------------------

    def decoder_new(self, dims: DecoderDims, layers, cos: torch.Tensor, sin: torch.Tensor):
        handle = self._lib.ps_decoder_new(ctypes.byref(dims), layers, cos.data_ptr(),
                                          sin.data_ptr())
        if not handle:
            raise KernelError(self._lib.ps_last_error().decode())
        return handle

    def decoder_free(self, handle) -> None:
        self._lib.ps_decoder_free(handle)

    def decoder_forward(self, handle, x: torch.Tensor, step: Step) -> None:
        if self._lib.ps_decoder_forward(handle, x.data_ptr(), ctypes.byref(step)) != 0:
            raise KernelError(self._lib.ps_last_error().decode())

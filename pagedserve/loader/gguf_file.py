"""The GGUF file format: the file memory-mapped, its metadata parsed, its tensors located.

Layout (v2/v3, little-endian)::

    b"GGUF"  version u32  tensor_count u64  kv_count u64
    kv_count x    (key: string, value_type: u32, value)
    tensor_count x (name: string, n_dims: u32, dims: n_dims x u64 (innermost first),
                    type: u32 (a GGML type), offset: u64 (from the data start))
    padding to general.alignment (default 32), then the tensor data

A string is a u64 byte length and UTF-8 bytes; an array a u32 item type, a u64 count, the
items (arrays may nest). We parse it ourselves rather than with gguf.GGUFReader, which builds a
numpy view per array element and needs seconds for a 50k-token vocabulary; the dequantization
math is still gguf's.

Every length and count is checked against the bytes that remain before it is believed, so a
corrupt or hostile file is a ModelLoadError naming the key or tensor and the byte offset, with
memory bounded by the file's size: strings and arrays that run past the end, more keys or
tensors than the header could hold, arrays nested deeper than MAX_ARRAY_DEPTH, unknown value
or GGML types, invalid UTF-8, duplicate keys or tensor names, a general.alignment that is not
a power of two, tensors of no dimension, more than 4 or a dimension of 0, rows that are not
whole quantization blocks, offsets off the alignment or data past the end of the file.

Numeric arrays are numpy arrays (their bytes copied, no more); strings and arrays of strings
are Python objects. Typed accessors (`integer`, `number`, `text`, `flag`, `strings`,
`integers`, `numbers`) check a value's type and range and name the key when it is wrong.
"""

from __future__ import annotations

import math
import mmap
import struct
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from pagedserve.loader import checks
from pagedserve.loader.loaded_model import ModelLoadError

# GGUF value types -> struct format (little-endian); 8 is a string, 9 an array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
          10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
_TYPE_NAMES = {0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32",
               6: "float32", 7: "bool", 8: "string", 9: "array", 10: "uint64", 11: "int64",
               12: "float64"}

# Metadata arrays that are vocabulary-sized and kept out of `metadata()`.
_BIG_ARRAYS = {
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.precompiled_charsmap",
}
_MAX_METADATA_ARRAY = 1024

MAX_ARRAY_DEPTH = 4  # the format allows arrays of arrays; no model file nests them at all
MAX_TENSOR_DIMS = 4  # ggml's GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32
# The fewest bytes one entry can take: a key (u64 length, >= 0 bytes), a type, a 1-byte value;
# a tensor info (u64 name length, n_dims, >= 1 dim, type, offset).
_MIN_KV_BYTES = 8 + 4 + 1
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8


class GGUFTensor(NamedTuple):
    name: str
    shape: tuple[int, ...]  # GGUF order: innermost (in_features) first
    type_id: int
    offset: int  # absolute, in the file
    n_elements: int
    n_bytes: int

    @property
    def type_name(self) -> str:
        import gguf

        try:
            return gguf.GGMLQuantizationType(self.type_id).name
        except ValueError:
            return f"type {self.type_id}"


class GGUFFile:
    """A GGUF file, memory-mapped: metadata parsed to Python values, tensors located."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = path.name  # what messages call it
        if not path.is_file():
            raise ModelLoadError(f"GGUF file does not exist: {path}")
        self.file_size = path.stat().st_size
        with path.open("rb") as f:
            magic = f.read(4)
            if magic != b"GGUF":
                raise ModelLoadError(
                    f"{path} is not a GGUF file (starts with {magic!r}, not b'GGUF')"
                )
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._pos = 4
        self._reading = "the header"  # what the parser is in, for messages
        self.fields: dict[str, Any] = {}
        self.tensors: dict[str, GGUFTensor] = {}
        self._parse()

    # -- header parsing ----------------------------------------------------------------------

    def _corrupt(self, problem: str) -> ModelLoadError:
        return ModelLoadError(f"{self.name} is a corrupt GGUF file: {self._reading} {problem} "
                              f"(at byte {self._pos} of {self.file_size})")

    def _truncated(self, needed: int) -> ModelLoadError:
        return ModelLoadError(
            f"{self.name} is a truncated or corrupt GGUF file: {self._reading} needs {needed} "
            f"bytes at byte {self._pos}, past the end of the file ({self.file_size} bytes)")

    def _need(self, n: int) -> None:
        if n > self.file_size - self._pos:
            raise self._truncated(n)

    def _unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        self._need(size)
        (value,) = struct.unpack_from(fmt, self._mm, self._pos)
        self._pos += size
        return value

    def _string(self) -> str:
        n = self._unpack("<Q")
        self._need(n)
        try:
            text = self._mm[self._pos : self._pos + n].decode("utf-8")
        except UnicodeDecodeError:
            raise self._corrupt("is not valid UTF-8") from None
        self._pos += n
        return text

    def _value(self, kind: int, depth: int = 0):
        if kind in _SCALARS:
            return self._unpack(_SCALARS[kind])
        if kind == _STRING:
            return self._string()
        if kind != _ARRAY:
            raise self._corrupt(f"has unknown value type {kind}")
        if depth >= MAX_ARRAY_DEPTH:
            raise self._corrupt(f"nests arrays more than {MAX_ARRAY_DEPTH} deep")
        item, count = self._unpack("<I"), self._unpack("<Q")
        if item in _NUMPY:
            dtype = np.dtype(_NUMPY[item])
            self._need(count * dtype.itemsize)
            values = np.frombuffer(self._mm, dtype, count, self._pos).copy()
            self._pos += count * dtype.itemsize
            return values
        if item not in (_STRING, _ARRAY):
            raise self._corrupt(f"is an array of unknown value type {item}")
        # each string takes at least its 8-byte length, each array its 12-byte header
        self._need(count * (8 if item == _STRING else 12))
        return [self._value(item, depth + 1) for _ in range(count)]

    def _parse(self) -> None:
        version = self._unpack("<I")
        if version not in (2, 3):
            raise ModelLoadError(f"{self.name}: GGUF version {version} is not supported "
                                 "(2 and 3 are); the file may be corrupt")
        n_tensors, n_kv = self._unpack("<Q"), self._unpack("<Q")
        if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES > self.file_size - self._pos:
            raise ModelLoadError(
                f"{self.name} is a truncated or corrupt GGUF file: its header claims {n_kv} "
                f"keys and {n_tensors} tensors, more than its {self.file_size} bytes can hold")
        for i in range(n_kv):
            self._reading = f"metadata key {i}"
            key = self._string()
            self._reading = f"metadata key {key!r}"
            if key in self.fields:
                raise self._corrupt("appears twice")
            self.fields[key] = self._value(self._unpack("<I"))
        alignment = self._alignment()
        seen: set[str] = set()
        infos = [self._tensor_info(i, alignment, seen) for i in range(n_tensors)]
        data_start = -(-self._pos // alignment) * alignment
        for name, shape, type_id, offset in infos:
            self._reading = f"tensor {name!r}"
            n_elements = math.prod(shape)
            n_bytes = _n_bytes(self.name, name, type_id, shape)
            end = data_start + offset + n_bytes
            if end > self.file_size:
                raise ModelLoadError(
                    f"{self.name} is truncated: tensor {name!r} ends at byte {end} but the "
                    f"file has {self.file_size} bytes"
                )
            self.tensors[name] = GGUFTensor(name, shape, type_id, data_start + offset,
                                            n_elements, n_bytes)

    def _alignment(self) -> int:
        value = self.fields.get("general.alignment", DEFAULT_ALIGNMENT)
        alignment = checks.integer(self.name, "general.alignment", value, 1, 1 << 30)
        if alignment & (alignment - 1):
            raise ModelLoadError(f"{self.name}: general.alignment must be a power of two, "
                                 f"found {alignment}")
        return alignment

    def _tensor_info(self, i: int, alignment: int, seen: set[str]
                     ) -> tuple[str, tuple[int, ...], int, int]:
        self._reading = f"tensor info {i}"
        name = self._string()
        self._reading = f"tensor {name!r}"
        if name in seen:
            raise self._corrupt("appears twice")
        seen.add(name)
        n_dims = self._unpack("<I")
        if not 1 <= n_dims <= MAX_TENSOR_DIMS:
            raise self._corrupt(f"has {n_dims} dimensions (1 to {MAX_TENSOR_DIMS} are allowed)")
        shape = tuple(self._unpack("<Q") for _ in range(n_dims))
        if 0 in shape or math.prod(shape) >= 1 << 63:
            raise self._corrupt(f"has dimensions {list(shape)}")
        type_id, offset = self._unpack("<I"), self._unpack("<Q")
        if offset % alignment:
            raise self._corrupt(f"has offset {offset}, not a multiple of the alignment "
                                f"{alignment}")
        return name, shape, type_id, offset

    # -- access ------------------------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def integer(self, key: str, default: Any = None, lo: int = 0, hi: int | None = None) -> Any:
        """The value of `key` as an int in [lo, hi]; `default` when absent."""
        value = self.fields.get(key)
        return default if value is None else checks.integer(self.name, key, value, lo, hi)

    def number(self, key: str, default: Any = None, lo: float = -math.inf,
               hi: float | None = None, above: bool = False) -> Any:
        value = self.fields.get(key)
        if value is None:
            return default
        return checks.number(self.name, key, value, lo, hi, above)

    def text(self, key: str, default: Any = None) -> Any:
        value = self.fields.get(key)
        return default if value is None else checks.text(self.name, key, value)

    def flag(self, key: str, default: Any = None) -> Any:
        value = self.fields.get(key)
        return default if value is None else checks.flag(self.name, key, value)

    def strings(self, key: str, length: int | None = None) -> list[str] | None:
        """An array of strings (of `length` items when given); None when absent."""
        value = self.fields.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ModelLoadError(f"{self.name}: {key} must be an array of strings, found "
                                 f"{self._kind(value)}")
        self._check_length(key, value, length)
        return value

    def integers(self, key: str, length: int | None = None) -> list[int] | None:
        value = self._array(key, "iu", "integers", length)
        return None if value is None else value.tolist()

    def numbers(self, key: str, length: int | None = None) -> list[float] | None:
        value = self._array(key, "iuf", "numbers", length)
        if value is None:
            return None
        if not np.isfinite(value).all():
            raise ModelLoadError(f"{self.name}: {key} holds a value that is not finite")
        return value.tolist()

    def _array(self, key: str, kinds: str, what: str, length: int | None) -> np.ndarray | None:
        """The numeric array at `key` (numpy dtype kinds `kinds`), its length checked."""
        value = self.fields.get(key)
        if value is None:
            return None
        if not isinstance(value, np.ndarray) or value.dtype.kind not in kinds:
            raise ModelLoadError(f"{self.name}: {key} must be an array of {what}, found "
                                 f"{self._kind(value)}")
        self._check_length(key, value, length)
        return value

    def _check_length(self, key: str, value, length: int | None) -> None:
        if length is not None and len(value) != length:
            raise ModelLoadError(f"{self.name}: {key} has {len(value)} items, but there are "
                                 f"{length} tokens")

    @staticmethod
    def _kind(value: Any) -> str:
        if isinstance(value, np.ndarray):
            return f"an array of {len(value)} {value.dtype.name} items"
        if isinstance(value, list):
            kinds = sorted({type(v).__name__ for v in value[:1000]})
            return f"an array of {len(value)} items ({', '.join(kinds) or 'empty'})"
        return checks.describe(value)

    def tensor_bytes(self, tensor: GGUFTensor) -> np.ndarray:
        """The tensor's raw bytes, a view into the mapped file."""
        return np.frombuffer(self._mm, np.uint8, tensor.n_bytes, tensor.offset)

    def metadata(self) -> dict[str, Any]:
        """JSON-able key/values, without vocabulary-sized arrays."""
        out = {}
        for key, value in self.fields.items():
            if key in _BIG_ARRAYS or (isinstance(value, (list, np.ndarray))
                                      and len(value) > _MAX_METADATA_ARRAY):
                continue
            out[key] = _jsonable(value)
        return out

    @property
    def arch(self) -> str:
        arch = self.get("general.architecture")
        if not isinstance(arch, str):
            if arch is None:
                raise ModelLoadError(f"{self.name} has no general.architecture in its metadata")
            raise ModelLoadError(f"{self.name}: general.architecture must be a string, found "
                                 f"{checks.describe(arch)}")
        return arch

    def arch_key(self, suffix: str) -> str:
        """The full key of an architecture's parameter: "llama.block_count"."""
        return f"{self.arch}.{suffix}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _n_bytes(file_name: str, name: str, type_id: int, shape: tuple[int, ...]) -> int:
    import gguf

    try:
        block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(type_id)]
    except (ValueError, KeyError):
        raise ModelLoadError(
            f"{file_name}: tensor {name!r} has unknown GGML type id {type_id}; the file may be "
            "corrupt or newer than this gguf library"
        ) from None
    if shape[0] % block_size:
        raise ModelLoadError(
            f"{file_name}: tensor {name!r}: rows of {shape[0]} elements are not a whole "
            f"number of {block_size}-element blocks"
        )
    return math.prod(shape) // block_size * type_size

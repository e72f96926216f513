"""A GGUF file as editable parts, for tests that write files the loader must refuse.

`GGUFImage.read(path)` parses the header (keys with their value types, tensor infos) and keeps
the tensor data as bytes; `encode()` writes it back. Unlike gguf.GGUFWriter it writes whatever
it is given: a count that lies, a type id that does not exist, an array nested 200,000 deep.
Independent of pagedserve's reader on purpose: the tests check that reader against this one.

Layout (little-endian): b"GGUF", version u32, tensor count u64, key count u64, the keys
(string key, u32 value type, value), the tensor infos (string name, u32 n_dims, u64 dims
innermost first, u32 type id, u64 offset from the data start), padding to `alignment`, data.
A string is a u64 byte length and UTF-8 bytes; an array a u32 item type, a u64 count, items.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
           10: "<Q", 11: "<q", 12: "<d"}
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL = range(8)
STRING, ARRAY, UINT64, INT64, FLOAT64 = 8, 9, 10, 11, 12
INTEGERS = (UINT8, INT8, UINT16, INT16, UINT32, INT32, UINT64, INT64)


@dataclass
class Value:
    """A typed metadata value; an array's `value` is a list of Values' raw values when
    `item_type` is a scalar or string, or a list of Value for nested arrays."""

    type: int
    value: Any
    item_type: int | None = None
    raw: bytes | None = None  # written instead of the encoded value: a length that lies


@dataclass
class TensorInfo:
    name: str
    dims: list[int]
    type_id: int
    offset: int
    raw: bytes | None = None  # written instead of the encoded info


@dataclass
class GGUFImage:
    version: int = 3
    fields: dict[str, Value] = field(default_factory=dict)
    tensors: list[TensorInfo] = field(default_factory=list)
    data: bytes = b""
    alignment: int = 32  # where the data starts; general.alignment in `fields` is what a reader sees
    # counts written in the header; None: the true ones
    tensor_count: int | None = None
    key_count: int | None = None

    @classmethod
    def read(cls, path: Path) -> GGUFImage:
        raw = Path(path).read_bytes()
        reader = _Reader(raw)
        assert reader.take(4) == b"GGUF"
        version = reader.scalar(UINT32)
        n_tensors, n_kv = reader.scalar(UINT64), reader.scalar(UINT64)
        fields = {}
        for _ in range(n_kv):
            key = reader.string()
            kind = reader.scalar(UINT32)
            fields[key] = reader.value(kind)
        tensors = []
        for _ in range(n_tensors):
            name = reader.string()
            dims = [reader.scalar(UINT64) for _ in range(reader.scalar(UINT32))]
            tensors.append(TensorInfo(name, dims, reader.scalar(UINT32), reader.scalar(UINT64)))
        alignment = fields["general.alignment"].value if "general.alignment" in fields else 32
        start = -(-reader.pos // alignment) * alignment
        return cls(version, fields, tensors, raw[start:], alignment)

    def header(self) -> bytes:
        out = [b"GGUF", struct.pack("<I", self.version),
               struct.pack("<Q", len(self.tensors) if self.tensor_count is None
                           else self.tensor_count),
               struct.pack("<Q", len(self.fields) if self.key_count is None else self.key_count)]
        for key, value in self.fields.items():
            out += [encode_string(key), struct.pack("<I", value.type), encode_value(value)]
        for t in self.tensors:
            if t.raw is not None:
                out.append(t.raw)
                continue
            out += [encode_string(t.name), struct.pack("<I", len(t.dims)),
                    *(struct.pack("<Q", d) for d in t.dims), struct.pack("<I", t.type_id),
                    struct.pack("<Q", t.offset)]
        return b"".join(out)

    def encode(self) -> bytes:
        header = self.header()
        padding = -len(header) % self.alignment
        return header + b"\0" * padding + self.data

    def write(self, path: Path) -> Path:
        Path(path).write_bytes(self.encode())
        return Path(path)

    def copy(self) -> GGUFImage:
        import copy

        return copy.deepcopy(self)


def encode_string(text: str | bytes) -> bytes:
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def encode_value(value: Value) -> bytes:
    if value.raw is not None:
        return value.raw
    if value.type in SCALARS:
        return struct.pack(SCALARS[value.type], value.value)
    if value.type == STRING:
        return encode_string(value.value)
    assert value.type == ARRAY
    items = value.value
    parts = [struct.pack("<I", value.item_type), struct.pack("<Q", len(items))]
    if value.item_type in SCALARS:
        fmt = "<" + SCALARS[value.item_type][1] * len(items)
        parts.append(struct.pack(fmt, *items))
    elif value.item_type == STRING:
        parts += [encode_string(s) for s in items]
    else:
        parts += [encode_value(item) for item in items]
    return b"".join(parts)


def nested_array(depth: int) -> bytes:
    """A value of type ARRAY (without its type id) holding one array, `depth` levels down,
    built iteratively: encode_value would recurse as deep."""
    innermost = struct.pack("<IQ", UINT8, 0)
    return struct.pack("<IQ", ARRAY, 1) * (depth - 1) + innermost


class _Reader:
    def __init__(self, raw: bytes) -> None:
        self.raw, self.pos = raw, 0

    def take(self, n: int) -> bytes:
        out = self.raw[self.pos : self.pos + n]
        self.pos += n
        return out

    def scalar(self, kind: int):
        fmt = SCALARS[kind]
        (value,) = struct.unpack(fmt, self.take(struct.calcsize(fmt)))
        return value

    def string(self) -> str:
        return self.take(self.scalar(UINT64)).decode("utf-8")

    def value(self, kind: int) -> Value:
        if kind in SCALARS:
            return Value(kind, self.scalar(kind))
        if kind == STRING:
            return Value(kind, self.string())
        item_type, count = self.scalar(UINT32), self.scalar(UINT64)
        if item_type in SCALARS:
            fmt = "<" + SCALARS[item_type][1] * count
            items = list(struct.unpack(fmt, self.take(struct.calcsize(fmt))))
        elif item_type == STRING:
            items = [self.string() for _ in range(count)]
        else:
            items = [self.value(item_type) for _ in range(count)]
        return Value(ARRAY, items, item_type)


# ---------------------------------------------------------------------------------------------
# A small model with a real model's metadata

Q4_1, Q8_0, F32 = 3, 8, 0
_BLOCKS = {Q4_1: (32, 20), Q8_0: (32, 34), F32: (1, 4)}  # elements, bytes per block


def shrink(source: GGUFImage, vocab: int = 400, hidden: int = 64, ffn: int = 128,
           heads: int = 4, kv_heads: int = 2, layers: int = 2, seed: int = 0) -> GGUFImage:
    """`source` (a llama-family GGUF such as the bundled SmolLM2) with its metadata, template
    and the first `vocab` tokens of its vocabulary (and the merges among them), but a model of
    the given size: Q8_0 embeddings, Q4_1 matrices, F32 norms, random values of weight-like
    scale. Loads in milliseconds, so that hundreds of mutations of it can be loaded."""
    import numpy as np

    rng = np.random.default_rng(seed)
    image = GGUFImage(source.version, dict(source.fields), [], b"", source.alignment)
    arch = source.fields["general.architecture"].value
    head_dim = hidden // heads
    sizes = {"block_count": layers, "embedding_length": hidden, "feed_forward_length": ffn,
             "attention.head_count": heads, "attention.head_count_kv": kv_heads,
             "rope.dimension_count": head_dim, "vocab_size": vocab}
    for key, value in sizes.items():
        image.fields[f"{arch}.{key}"] = Value(UINT32, value)
    tokens = source.fields["tokenizer.ggml.tokens"].value[:vocab]
    kept = set(tokens)
    image.fields["tokenizer.ggml.tokens"] = Value(ARRAY, tokens, STRING)
    if "tokenizer.ggml.token_type" in source.fields:
        types = source.fields["tokenizer.ggml.token_type"]
        image.fields["tokenizer.ggml.token_type"] = Value(ARRAY, types.value[:vocab],
                                                          types.item_type)
    if "tokenizer.ggml.merges" in source.fields:
        merges = [m for m in source.fields["tokenizer.ggml.merges"].value
                  if (pair := m.split(" ", 1)) and len(pair) == 2
                  and pair[0] in kept and pair[1] in kept and pair[0] + pair[1] in kept]
        image.fields["tokenizer.ggml.merges"] = Value(ARRAY, merges, STRING)

    shapes = {"token_embd.weight": ([hidden, vocab], Q8_0),
              "output_norm.weight": ([hidden], F32)}
    for i in range(layers):
        shapes |= {f"blk.{i}.attn_norm.weight": ([hidden], F32),
                   f"blk.{i}.ffn_norm.weight": ([hidden], F32),
                   f"blk.{i}.attn_q.weight": ([hidden, heads * head_dim], Q4_1),
                   f"blk.{i}.attn_k.weight": ([hidden, kv_heads * head_dim], Q4_1),
                   f"blk.{i}.attn_v.weight": ([hidden, kv_heads * head_dim], Q4_1),
                   f"blk.{i}.attn_output.weight": ([heads * head_dim, hidden], Q4_1),
                   f"blk.{i}.ffn_gate.weight": ([hidden, ffn], Q4_1),
                   f"blk.{i}.ffn_up.weight": ([hidden, ffn], Q4_1),
                   f"blk.{i}.ffn_down.weight": ([ffn, hidden], Q4_1)}
    data = bytearray()
    for name, (dims, type_id) in shapes.items():
        data += b"\0" * (-len(data) % image.alignment)
        image.tensors.append(TensorInfo(name, dims, type_id, len(data)))
        data += _random_blocks(type_id, int(np.prod(dims)), rng)
    image.data = bytes(data)
    return image


def _random_blocks(type_id: int, n: int, rng) -> bytes:
    import numpy as np

    if type_id == F32:
        return np.ones(n, dtype=np.float32).tobytes()
    block, nbytes = _BLOCKS[type_id]
    raw = rng.integers(0, 256, size=(n // block, nbytes), dtype=np.uint8)
    if type_id == Q4_1:  # fp16 scale, fp16 minimum, 16 bytes of nibbles
        raw[:, 0:2] = np.frombuffer(np.float16(0.04 / 15).tobytes(), np.uint8)
        raw[:, 2:4] = np.frombuffer(np.float16(-0.02).tobytes(), np.uint8)
    else:  # Q8_0: fp16 scale, 32 int8
        raw[:, 0:2] = np.frombuffer(np.float16(0.02 / 127).tobytes(), np.uint8)
    return raw.tobytes()

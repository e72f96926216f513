"""llama.cpp GGUF files: metadata -> ModelConfig and Tokenizer, tensors -> HF-named weights.

The file is memory-mapped and its header parsed here (see `GGUFFile`); each tensor is
dequantized with `gguf.quants.dequantize` and cast to the runtime dtype one at a time, so peak
memory is the result plus one float32 tensor.

Two things differ from a Hugging Face checkpoint besides the names:

- llama.cpp's converter permutes the rows of q_proj/k_proj of the Llama family so that rotary
  pairs are adjacent (GPT-J style, dims (2i, 2i+1)) instead of half-split (dims (i, i+d/2)).
  `_unpermute` undoes it; Qwen2 files are written unpermuted.
- Llama 3 rope scaling is stored as a `rope_freqs` tensor of per-frequency divisors rather
  than as parameters; `llama3_scaling_from_freqs` recovers the HF `rope_scaling` dict.
"""

from __future__ import annotations

import logging
import math
import mmap
import struct
import time
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from pagedserve.config import ModelConfig
from pagedserve.loader import (
    LoadedModel,
    ModelInfo,
    ModelLoadError,
    check_weights,
    tensor_progress,
    weight_cache,
)
from pagedserve.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# GGUF architecture name -> our ModelConfig.architecture
_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
_PERMUTED_QK = {"llama", "mistral"}  # families whose q/k rows llama.cpp permutes

# Dequantization is gguf.quants'; tests/test_loader.py checks F32, F16, BF16, Q4_0, Q4_1, Q5_0,
# Q5_1, Q8_0, Q4_K, Q5_K and Q6_K against known values. Other types gguf implements (Q2_K,
# Q3_K, IQ*) load too, unverified by us; the rest raise ModelLoadError.

# Metadata arrays that are vocabulary-sized and kept out of ModelInfo.metadata.
_BIG_ARRAYS = {
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.precompiled_charsmap",
}
_MAX_METADATA_ARRAY = 1024

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


# ---------------------------------------------------------------------------------------------
# Reading the file


# GGUF value types -> struct format (little-endian); 8 is a string, 9 an array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
          10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


class _Truncated(Exception):
    pass


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
    """A GGUF file, memory-mapped: metadata parsed to Python values, tensors located.

    The layout (v2/v3, little-endian): magic, version u32, tensor count u64, key/value count
    u64, the key/values, the tensor infos (name, dims, type, offset), then the tensor data
    from the next multiple of `general.alignment`. We parse it ourselves rather than with
    gguf.GGUFReader, which builds a numpy view per array element and needs seconds for a
    50k-token vocabulary; the dequantization math is still gguf's.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
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
        try:
            self._parse()
        except (_Truncated, struct.error) as exc:
            raise ModelLoadError(
                f"{path} is a truncated or corrupt GGUF file (header ends early at byte "
                f"{self._pos} of {self.file_size})"
            ) from exc
        except (UnicodeDecodeError, ValueError, OverflowError) as exc:
            raise ModelLoadError(f"{path} is a corrupt GGUF file: {exc}") from exc

    # -- header parsing ----------------------------------------------------------------------

    def _unpack(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self._mm, self._pos)
        self._pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._unpack("<Q")
        end = self._pos + n
        if end > self.file_size:
            raise _Truncated
        text = self._mm[self._pos : end].decode("utf-8")
        self._pos = end
        return text

    def _value(self, kind: int):
        if kind in _SCALARS:
            return self._unpack(_SCALARS[kind])
        if kind == _STRING:
            return self._string()
        if kind != _ARRAY:
            raise ValueError(f"unknown metadata value type {kind} at byte {self._pos}")
        item, count = self._unpack("<I"), self._unpack("<Q")
        if item in _NUMPY:
            dtype = np.dtype(_NUMPY[item])
            if self._pos + count * dtype.itemsize > self.file_size:
                raise _Truncated
            values = np.frombuffer(self._mm, dtype, count, self._pos).tolist()
            self._pos += count * dtype.itemsize
            return values
        if count > self.file_size:
            raise _Truncated
        return [self._value(item) for _ in range(count)]

    def _parse(self) -> None:
        version = self._unpack("<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_kv = self._unpack("<Q"), self._unpack("<Q")
        if n_tensors > self.file_size or n_kv > self.file_size:
            raise _Truncated
        self.fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            self.fields[key] = self._value(self._unpack("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._unpack("<I")
            if n_dims > 8:
                raise ValueError(f"tensor {name!r} has {n_dims} dimensions")
            shape = tuple(self._unpack("<Q") for _ in range(n_dims))
            infos.append((name, shape, self._unpack("<I"), self._unpack("<Q")))
        alignment = int(self.fields.get("general.alignment", 32))
        if alignment <= 0:
            raise ValueError(f"general.alignment is {alignment}")
        data_start = -(-self._pos // alignment) * alignment
        self.tensors: dict[str, GGUFTensor] = {}
        for name, shape, type_id, offset in infos:
            n_elements = math.prod(shape)
            self.tensors[name] = GGUFTensor(name, shape, type_id, data_start + offset,
                                            n_elements, _n_bytes(name, type_id, n_elements))
            end = data_start + offset + self.tensors[name].n_bytes
            if end > self.file_size:
                raise ModelLoadError(
                    f"{self.path} is truncated: tensor {name!r} ends at byte {end} but the "
                    f"file has {self.file_size} bytes"
                )

    # -- access ------------------------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def tensor_bytes(self, tensor: GGUFTensor) -> np.ndarray:
        """The tensor's raw bytes, a view into the mapped file."""
        return np.frombuffer(self._mm, np.uint8, tensor.n_bytes, tensor.offset)

    def metadata(self) -> dict[str, Any]:
        """JSON-able key/values, without vocabulary-sized arrays."""
        return {
            key: value
            for key, value in self.fields.items()
            if key not in _BIG_ARRAYS
            and not (isinstance(value, list) and len(value) > _MAX_METADATA_ARRAY)
        }

    @property
    def arch(self) -> str:
        arch = self.get("general.architecture")
        if not isinstance(arch, str):
            raise ModelLoadError(f"{self.path} has no general.architecture in its metadata")
        return arch

    def arch_key(self, suffix: str, default: Any = None) -> Any:
        return self.get(f"{self.arch}.{suffix}", default)


def _n_bytes(name: str, type_id: int, n_elements: int) -> int:
    import gguf

    try:
        block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(type_id)]
    except (ValueError, KeyError):
        raise ModelLoadError(
            f"tensor {name!r} has unknown GGML type id {type_id}; the file may be corrupt or "
            "newer than this gguf library"
        ) from None
    if n_elements % block_size:
        raise ModelLoadError(
            f"tensor {name!r}: {n_elements} elements is not a whole number of "
            f"{block_size}-element blocks"
        )
    return n_elements // block_size * type_size


def _quantization(f: GGUFFile) -> str:
    import gguf

    file_type = f.get("general.file_type")
    if file_type is not None:
        try:
            name = gguf.LlamaFileType(int(file_type)).name
            return name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            logger.debug("unknown general.file_type %s; naming the dominant tensor type", file_type)
    # No (known) file type: the type holding most elements among matrices.
    counts: Counter[str] = Counter()
    for t in f.tensors.values():
        if len(t.shape) >= 2:
            counts[t.type_name] += t.n_elements
    return counts.most_common(1)[0][0] if counts else "F32"


def read_gguf_info(path: Path) -> ModelInfo:
    f = GGUFFile(path)
    return _info(f)


def _info(f: GGUFFile) -> ModelInfo:
    arch = f.arch
    return ModelInfo(
        path=f.path,
        format="gguf",
        quantization=_quantization(f),
        family=arch,
        architecture=arch,
        parameter_count=sum(t.n_elements for t in f.tensors.values()),
        context_length=int(f.arch_key("context_length", 0) or 0),
        file_size=f.file_size,
        metadata=f.metadata(),
    )


# ---------------------------------------------------------------------------------------------
# Config


def _model_config(f: GGUFFile) -> ModelConfig:
    arch = f.arch
    if arch not in _ARCHITECTURES:
        raise ModelLoadError(
            f"unsupported architecture {arch!r} in {f.path.name}; "
            f"supported: {', '.join(sorted(_ARCHITECTURES))}"
        )

    def required(suffix: str) -> Any:
        value = f.arch_key(suffix)
        if value is None:
            raise ModelLoadError(f"{f.path.name} has no {arch}.{suffix} in its metadata")
        return value

    hidden = int(required("embedding_length"))
    num_heads = int(required("attention.head_count"))
    num_kv_heads = int(f.arch_key("attention.head_count_kv", num_heads))
    head_dim = int(f.arch_key("attention.key_length", hidden // num_heads))
    vocab_size = f.arch_key("vocab_size")
    if vocab_size is None:
        tokens = f.get("tokenizer.ggml.tokens")
        if tokens is not None:
            vocab_size = len(tokens)
        elif "token_embd.weight" in f.tensors:
            vocab_size = int(f.tensors["token_embd.weight"].shape[1])
        else:
            raise ModelLoadError(f"{f.path.name}: cannot tell the vocabulary size")
    try:
        return ModelConfig(
            architecture=_ARCHITECTURES[arch],
            vocab_size=int(vocab_size),
            hidden_size=hidden,
            intermediate_size=int(required("feed_forward_length")),
            num_layers=int(required("block_count")),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=_from_f32(f.arch_key("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=_from_f32(f.arch_key("rope.freq_base", 10000.0)),
            rope_scaling=_rope_scaling(f, head_dim),
            max_position_embeddings=int(f.arch_key("context_length", 2048)),
            tie_word_embeddings="output.weight" not in f.tensors,
            attention_bias="blk.0.attn_q.bias" in f.tensors,
        )
    except ValueError as exc:
        raise ModelLoadError(f"{f.path.name}: {exc}") from exc


def _from_f32(value: float) -> float:
    """GGUF stores these as float32: 1e-5 reads back as 9.9999997e-06; take the shortest
    decimal that rounds to the same float32 (what the converter was given)."""
    return float(str(np.float32(value)))


def _rope_scaling(f: GGUFFile, head_dim: int) -> dict | None:
    kind = f.arch_key("rope.scaling.type")
    factor = f.arch_key("rope.scaling.factor")
    if kind in ("linear", "yarn") and factor:
        scaling: dict[str, Any] = {"rope_type": kind, "factor": float(factor)}
        original = f.arch_key("rope.scaling.original_context_length")
        if original:
            scaling["original_max_position_embeddings"] = int(original)
        return scaling
    if "rope_freqs.weight" in f.tensors:
        freqs = dequantize_tensor(f, f.tensors["rope_freqs.weight"]).reshape(-1)
        rope_dim = int(f.arch_key("rope.dimension_count", head_dim))
        base = float(f.arch_key("rope.freq_base", 10000.0))
        return llama3_scaling_from_freqs(freqs, base, rope_dim)
    return None


def llama3_scaling_from_freqs(freqs: np.ndarray, base: float, rope_dim: int) -> dict | None:
    """Recover HF's llama3 `rope_scaling` from llama.cpp's per-frequency divisors.

    HF scales frequency i (wavelength w_i = 2*pi*base**(2i/d)) by 1/r_i, where r_i = 1 for
    short waves, `factor` for long ones, and in between 1/r = (1-s)/factor + s with
    s = (orig/w - low)/(high - low), which is linear in 1/w. The curve depends only on that
    line, so we fit it and report it with low_freq_factor=1; with fewer than two in-between
    points we assume Meta's low=1, high=4 (all Llama 3.x releases).
    """
    freqs = np.asarray(freqs, dtype=np.float64)
    factor = float(freqs.max())
    if factor <= 1.0 + 1e-6:
        return None
    i = np.arange(len(freqs), dtype=np.float64)
    inv_wavelen = 1.0 / (2 * math.pi * base ** (2 * i / rope_dim))
    smooth = (1.0 / freqs - 1.0 / factor) / (1.0 - 1.0 / factor)
    middle = (smooth > 1e-4) & (smooth < 1 - 1e-4)
    low, high, original = 1.0, 4.0, 8192.0
    if middle.sum() >= 2:
        slope, intercept = np.polyfit(inv_wavelen[middle], smooth[middle], 1)
        if intercept < 0 and slope > 0:  # s = orig/(high-low) * x - low/(high-low)
            high = low - low / intercept
            original = slope * (high - low)
    elif middle.sum() == 1:
        original = (smooth[middle][0] * (high - low) + low) / inv_wavelen[middle][0]
    return {
        "rope_type": "llama3",
        "factor": round(factor, 6),
        "low_freq_factor": round(low, 6),
        "high_freq_factor": round(float(high), 4),
        "original_max_position_embeddings": int(round(float(original))),
    }


# ---------------------------------------------------------------------------------------------
# Tensors


def dequantize_tensor(f: GGUFFile, tensor: GGUFTensor) -> np.ndarray:
    """float32 array shaped (out_features, in_features): GGUF lists dims innermost first."""
    import gguf

    shape = tuple(reversed(tensor.shape))
    raw = f.tensor_bytes(tensor)
    qtype = gguf.GGMLQuantizationType(tensor.type_id)
    if qtype == gguf.GGMLQuantizationType.F32:
        return raw.view(np.float32).reshape(shape).copy()
    if qtype == gguf.GGMLQuantizationType.F16:
        return raw.view(np.float16).astype(np.float32).reshape(shape)
    # gguf.quants wants rows of bytes: (rows, bytes per row)
    rows = raw.reshape(tensor.n_elements // tensor.shape[0], -1) if tensor.shape else raw
    try:
        return gguf.quants.dequantize(rows, qtype).reshape(shape)
    except NotImplementedError:
        raise ModelLoadError(
            f"tensor {tensor.name!r} has quantization type {qtype.name}, which is not supported"
        ) from None


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Invert llama.cpp's q/k row permutation: per head, rows (2i, 2i+1) go back to (i, i+d/2).

    llama.cpp views the rows as (heads, 2, d/2) and swaps the last two axes; viewing them as
    (heads, d/2, 2) and swapping back restores HF's order.
    """
    rows = w.shape[0]
    head_dim = rows // n_heads
    return (
        w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:])
        .transpose(1, 2)
        .reshape(rows, *w.shape[1:])
    )


def _hf_name(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    if name.startswith("blk."):
        _, layer, rest = name.split(".", 2)
        if rest in _LAYER_NAMES:
            return f"model.layers.{layer}.{_LAYER_NAMES[rest]}"
    return None


def _load_weights(
    f: GGUFFile, config: ModelConfig, dtype: torch.dtype, progress: bool
) -> dict[str, torch.Tensor]:
    permuted = f.arch in _PERMUTED_QK
    todo = [(t, _hf_name(t.name)) for t in f.tensors.values()]
    skipped = [t.name for t, name in todo if name is None and t.name != "rope_freqs.weight"]
    if skipped:
        logger.warning("ignoring GGUF tensors we have no use for: %s", ", ".join(skipped[:8]))
    todo = [(t, name) for t, name in todo if name is not None]
    weights: dict[str, torch.Tensor] = {}
    with tensor_progress(progress, len(todo), f.path.name) as advance:
        for tensor, name in todo:
            w = torch.from_numpy(dequantize_tensor(f, tensor)).to(dtype)
            if permuted and ".self_attn.q_proj." in name:
                w = _unpermute(w, config.num_heads)
            elif permuted and ".self_attn.k_proj." in name:
                w = _unpermute(w, config.num_kv_heads)
            weights[name] = w.contiguous()
            advance()
    check_weights(weights, config, f.path.name)
    return weights


# ---------------------------------------------------------------------------------------------
# Tokenizer
#
# llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4

# Pre-tokenizer split patterns by `tokenizer.ggml.pre`, as in the models' own tokenizer.json.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "falcon3": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes stand for
    themselves, the other 68 bytes are shifted to code points 256, 257, ..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in table)
    for n, b in enumerate(shifted):
        table[b] = chr(256 + n)
    return table


def _byte_level_pre_tokenizer(pre: str | None):
    from tokenizers import Regex, pre_tokenizers

    if pre in _SPLITS:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    if pre == "smollm":  # SmolLM's tokenizer.json: single digits, then GPT-2's split
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    if pre not in (None, "default", "gpt2", "gpt-2"):
        logger.info("tokenizer.ggml.pre %r is not known; splitting text like GPT-2", pre)
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def byte_level_bpe(tokens: list[str], merges: list[str], token_types: list[int],
                   pre: str | None):
    """`tokenizer.ggml.model == "gpt2"`: byte-level BPE from the vocabulary and merges."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models

    alphabet = _byte_alphabet()
    spelled = set(alphabet.values())
    vocab: dict[str, int] = {}
    for i, (token, kind) in enumerate(zip(tokens, token_types, strict=True)):
        # Normal tokens are spelled in the byte alphabet; a few converters write raw text.
        if kind == _NORMAL and not set(token) <= spelled:
            token = "".join(alphabet[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, i)
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = Backend(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = _byte_level_pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    _add_special_tokens(backend, tokens, token_types)
    return backend


def sentencepiece_bpe(tokens: list[str], scores: list[float], token_types: list[int],
                      merges: list[str] | None, add_space_prefix: bool = True):
    """`tokenizer.ggml.model == "llama"`: SentencePiece BPE with byte fallback and ▁ spaces.

    Merges, when the file has none, come from the scores: each normal token that splits into
    two vocabulary pieces yields a merge, ranked by the token's score (SentencePiece merges the
    pair whose result scores highest).
    """
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    if merges:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
    else:
        ranked = []
        for token, score, kind in zip(tokens, scores, token_types, strict=True):
            if kind != _NORMAL:
                continue
            for cut in range(1, len(token)):
                left, right = token[:cut], token[cut:]
                if left in vocab and right in vocab:
                    ranked.append((-float(score), len(ranked), left, right))
        ranked.sort()
        pairs = [(left, right) for _, _, left, right in ranked]
    unk = next((t for t, k in zip(tokens, token_types, strict=True) if k == _UNKNOWN), None)
    backend = Backend(models.BPE(vocab=vocab, merges=pairs, unk_token=unk, fuse_unk=True,
                                 byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_space_prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    _add_special_tokens(backend, tokens, token_types)
    return backend


def _add_special_tokens(backend, tokens: list[str], token_types: list[int]) -> None:
    """Control tokens become special tokens and user-defined ones added tokens, so that
    "<|im_start|>" in text is one token rather than pieces."""
    from tokenizers import AddedToken

    control, user = [], []
    for token, kind in zip(tokens, token_types, strict=True):
        if kind == _CONTROL:
            control.append(AddedToken(token, special=True, normalized=False))
        elif kind == _USER_DEFINED:
            user.append(AddedToken(token, special=False, normalized=False))
    backend.add_special_tokens(control)
    backend.add_tokens(user)


def tokenizer_from_gguf(f: GGUFFile) -> Tokenizer | None:
    """The Tokenizer the metadata describes (None when it has no `tokenizer.ggml.model`).

    EOS ids are eos, then eot/eom when present (chat models end turns with those); BOS is
    prepended when `add_bos_token` says so, by default for SentencePiece vocabularies only
    (llama.cpp's default).
    """
    kind = f.get("tokenizer.ggml.model")
    if kind is None:
        return None
    tokens = f.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ModelLoadError(f"{f.path.name}: tokenizer.ggml.model is set but there are no tokens")
    token_types = f.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if kind == "gpt2":
        backend = byte_level_bpe(
            tokens, f.get("tokenizer.ggml.merges") or [], token_types, f.get("tokenizer.ggml.pre")
        )
        default_add_bos = False
    elif kind == "llama":
        backend = sentencepiece_bpe(
            tokens,
            f.get("tokenizer.ggml.scores") or [0.0] * len(tokens),
            token_types,
            f.get("tokenizer.ggml.merges"),
            add_space_prefix=bool(f.get("tokenizer.ggml.add_space_prefix", True)),
        )
        default_add_bos = True
    else:
        raise ModelLoadError(
            f"{f.path.name}: tokenizer model {kind!r} is not supported (supported: gpt2, llama)"
        )

    def token_id(key: str) -> int | None:
        value = f.get(f"tokenizer.ggml.{key}")
        return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

    bos = token_id("bos_token_id")
    eos_ids = [i for i in (token_id(k) for k in ("eos_token_id", "eot_token_id", "eom_token_id"))
               if i is not None]
    names = {"bos_token": bos, "eos_token": token_id("eos_token_id"),
             "unk_token": token_id("unknown_token_id"), "pad_token": token_id("padding_token_id")}
    return Tokenizer(
        backend,
        bos_token_id=bos,
        eos_token_ids=eos_ids,
        add_bos=bool(f.get("tokenizer.ggml.add_bos_token", default_add_bos)),
        chat_template=f.get("tokenizer.chat_template"),
        special_tokens={name: tokens[i] if i is not None else None for name, i in names.items()},
    )


# ---------------------------------------------------------------------------------------------


def load_gguf(path: Path, dtype: torch.dtype = torch.float32, progress: bool = False) -> LoadedModel:
    start = time.perf_counter()
    f = GGUFFile(path)
    config = _model_config(f)
    tokenizer = tokenizer_from_gguf(f)
    weights = weight_cache.load(path, dtype)
    source = "the dequantized-weight cache"
    if weights is None:
        weights = _load_weights(f, config, dtype, progress)
        weight_cache.store(path, dtype, weights)
        source = "GGUF tensors"
    check_weights(weights, config, path.name)
    info = _info(f)
    generation_config: dict[str, Any] = {}
    if tokenizer is not None:
        generation_config = {"bos_token_id": tokenizer.bos_token_id,
                             "eos_token_id": list(tokenizer.eos_token_ids)}
    logger.info("loaded %s (%s, %s) from %s in %.2f s", path.name, config.architecture,
                info.quantization, source, time.perf_counter() - start)
    return LoadedModel(config=config, weights=weights, tokenizer=tokenizer, info=info,
                       generation_config=generation_config)

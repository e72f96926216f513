"""llama.cpp GGUF files: metadata -> ModelConfig and Tokenizer, tensors -> HF-named weights.

The file format is `gguf_file.py`'s, the tokenizer `gguf_tokenizer.py`'s; this module reads the
model. Each tensor is dequantized with `gguf.quants.dequantize` and cast to the runtime dtype one
at a time, so peak memory is the result plus one float32 tensor. Before the first one is, the
config read from the metadata is checked (`checks.py`: types, ranges, heads dividing the width)
and held against the tensors the file lists (each one the config needs, of its shape), and the
weights and rotary tables against the memory available.

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
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pagedserve.config import ModelConfig
from pagedserve.loader import checks, weight_cache
from pagedserve.loader.checks import check_shard_weights, check_weights
from pagedserve.loader.gguf_file import GGUFFile, GGUFTensor
from pagedserve.loader.gguf_tokenizer import tokenizer_from_gguf
from pagedserve.loader.loaded_model import LoadedModel, ModelInfo, ModelLoadError, tensor_progress
from pagedserve.parallel.tensor_shard import TensorShard

logger = logging.getLogger(__name__)

__all__ = ["GGUFFile", "GGUFTensor", "dequantize_tensor", "llama3_scaling_from_freqs",
           "load_gguf", "read_gguf_info", "tokenizer_from_gguf"]

# GGUF architecture name -> our ModelConfig.architecture
_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
_PERMUTED_QK = {"llama", "mistral"}  # families whose q/k rows llama.cpp permutes

# Dequantization is gguf.quants'; tests/test_loader.py checks F32, F16, BF16, Q4_0, Q4_1, Q5_0,
# Q5_1, Q8_0, Q4_K, Q5_K and Q6_K against known values. Other types gguf implements (Q2_K,
# Q3_K, IQ*) load too, unverified by us; the rest raise ModelLoadError.

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
# Info


def _quantization(f: GGUFFile) -> str:
    import gguf

    file_type = f.get("general.file_type")
    if isinstance(file_type, int) and not isinstance(file_type, bool):
        try:
            name = gguf.LlamaFileType(file_type).name
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
    """Metadata only; for an architecture we run, the config is checked as a load would
    check it, so that `show` and `list` name what is wrong with a file that cannot load."""
    f = GGUFFile(path)
    if f.arch in _ARCHITECTURES:
        _model_config(f)
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
        context_length=f.integer(f.arch_key("context_length"), 0, 0, checks.MAX_CONTEXT),
        file_size=f.file_size,
        metadata=f.metadata(),
    )


# ---------------------------------------------------------------------------------------------
# Config


def _config_keys(f: GGUFFile) -> checks.ConfigKeys:
    key = f.arch_key
    return checks.ConfigKeys(
        vocab_size=key("vocab_size"),
        hidden_size=key("embedding_length"),
        intermediate_size=key("feed_forward_length"),
        num_layers=key("block_count"),
        num_heads=key("attention.head_count"),
        num_kv_heads=key("attention.head_count_kv"),
        head_dim=key("attention.key_length"),
        rms_norm_eps=key("attention.layer_norm_rms_epsilon"),
        rope_theta=key("rope.freq_base"),
        rope_scaling=key("rope.scaling"),
        max_position_embeddings=key("context_length"),
    )


def _model_config(f: GGUFFile) -> ModelConfig:
    """The config the metadata describes, checked, and checked against the tensors listed."""
    arch = f.arch
    if arch not in _ARCHITECTURES:
        raise ModelLoadError(
            f"unsupported architecture {arch!r} in {f.name}; "
            f"supported: {', '.join(sorted(_ARCHITECTURES))}"
        )
    keys = _config_keys(f)

    def required(key: str) -> Any:
        value = f.get(key)
        if value is None:
            raise ModelLoadError(f"{f.name} has no {key} in its metadata")
        return value

    vocab_size = f.get(keys.vocab_size)
    tokens = f.get("tokenizer.ggml.tokens")
    if vocab_size is None:
        embedding = f.tensors.get("token_embd.weight")
        if isinstance(tokens, list):
            vocab_size, keys.vocab_size = len(tokens), "the count of tokenizer.ggml.tokens"
        elif embedding is not None and len(embedding.shape) == 2:
            vocab_size, keys.vocab_size = embedding.shape[1], "token_embd.weight's rows"
        else:
            raise ModelLoadError(f"{f.name}: cannot tell the vocabulary size")
    config = checks.checked_config(
        f.name, keys,
        architecture=_ARCHITECTURES[arch],
        vocab_size=vocab_size,
        hidden_size=required(keys.hidden_size),
        intermediate_size=required(keys.intermediate_size),
        num_layers=required(keys.num_layers),
        num_heads=required(keys.num_heads),
        num_kv_heads=f.get(keys.num_kv_heads),
        head_dim=f.get(keys.head_dim),
        rms_norm_eps=_from_f32(f.number(keys.rms_norm_eps, 1e-5, 0.0, 1.0)),
        rope_theta=_from_f32(f.number(keys.rope_theta, 10000.0, 1.0, above=True)),
        rope_scaling=None,
        max_position_embeddings=f.get(keys.max_position_embeddings, 2048),
        tie_word_embeddings="output.weight" not in f.tensors,
        attention_bias="blk.0.attn_q.bias" in f.tensors,
    )
    _check_heads(f, config)
    if isinstance(tokens, list) and len(tokens) > config.vocab_size:
        raise ModelLoadError(f"{f.name}: tokenizer.ggml.tokens has {len(tokens)} tokens, more "
                             f"than {keys.vocab_size} ({config.vocab_size})")
    _check_tensors(f, config, keys)
    config.rope_scaling = checks.checked_rope_scaling(f.name, keys.rope_scaling,
                                                      _rope_scaling(f, config))
    return config


def _check_heads(f: GGUFFile, config: ModelConfig) -> None:
    """Values and keys the same width as queries: the model rotates whole heads, as llama.cpp
    does for these families."""
    for suffix in ("rope.dimension_count", "attention.value_length"):
        key = f.arch_key(suffix)
        value = f.integer(key, config.head_dim, 0)
        if value != config.head_dim:
            raise ModelLoadError(f"{f.name}: {key} ({value}) must equal the head dimension "
                                 f"({config.head_dim})")


def _check_tensors(f: GGUFFile, config: ModelConfig, keys: checks.ConfigKeys) -> None:
    """Every tensor the config needs, listed with the shape it needs (before any is read)."""
    checks.check_layer_count(f.name, keys.num_layers, config.num_layers, len(f.tensors))
    names = {hf: t.name for t in f.tensors.values()
             if (hf := _hf_name(t.name, config.num_layers)) is not None}
    shapes = {hf: tuple(reversed(f.tensors[name].shape)) for hf, name in names.items()}
    checks.check_weight_shapes(f.name, config, shapes, names)


def _from_f32(value: float) -> float:
    """GGUF stores these as float32: 1e-5 reads back as 9.9999997e-06; take the shortest
    decimal that rounds to the same float32 (what the converter was given)."""
    return float(str(np.float32(value)))


def _rope_scaling(f: GGUFFile, config: ModelConfig) -> dict | None:
    kind = f.text(f.arch_key("rope.scaling.type"))
    factor = f.number(f.arch_key("rope.scaling.factor"), None, 0.0)
    if kind in ("linear", "yarn") and factor:
        scaling: dict[str, Any] = {"rope_type": kind, "factor": factor}
        original = f.integer(f.arch_key("rope.scaling.original_context_length"), None, 0,
                             checks.MAX_CONTEXT)
        if original:
            scaling["original_max_position_embeddings"] = original
        return scaling
    tensor = f.tensors.get("rope_freqs.weight")
    if tensor is None:
        return None
    rope_dim = config.head_dim
    if tensor.shape != (rope_dim // 2,):
        raise ModelLoadError(f"{f.name}: tensor 'rope_freqs.weight' has shape {tensor.shape}, "
                             f"but heads of {rope_dim} dimensions need ({rope_dim // 2},)")
    freqs = dequantize_tensor(f, tensor).reshape(-1)
    if not (np.isfinite(freqs).all() and (freqs > 0).all()):
        raise ModelLoadError(f"{f.name}: tensor 'rope_freqs.weight' must hold positive finite "
                             "divisors")
    try:
        return llama3_scaling_from_freqs(freqs, config.rope_theta, rope_dim)
    except ValueError as exc:
        raise ModelLoadError(f"{f.name}: tensor 'rope_freqs.weight': {exc}") from None


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
    if not (math.isfinite(high) and math.isfinite(original)):
        raise ValueError("its divisors fit no llama3 rope scaling")
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


def _hf_name(name: str, num_layers: int) -> str | None:
    """The Hugging Face name of a GGUF tensor we use; None for the others (and for layers
    past `num_layers`, which a model of the config would never read)."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        layer = parts[1]
        if layer.isdecimal() and str(int(layer)) == layer and int(layer) < num_layers:
            return f"model.layers.{layer}.{_LAYER_NAMES[parts[2]]}"
    return None


def _used_tensors(f: GGUFFile, config: ModelConfig) -> list[tuple[GGUFTensor, str]]:
    todo = [(t, _hf_name(t.name, config.num_layers)) for t in f.tensors.values()]
    skipped = [t.name for t, name in todo if name is None and t.name != "rope_freqs.weight"]
    if skipped:
        logger.warning("ignoring GGUF tensors we have no use for: %s", ", ".join(skipped[:8]))
    return [(t, name) for t, name in todo if name is not None]


def _load_weights(f: GGUFFile, todo: list[tuple[GGUFTensor, str]], config: ModelConfig,
                  dtype: torch.dtype, progress: bool, shard: TensorShard | None = None
                  ) -> dict[str, torch.Tensor]:
    """`shard`: each tensor is dequantized whole (llama.cpp's q/k row order must be undone
    on whole heads) and cut to that rank's part before the next is read."""
    permuted = f.arch in _PERMUTED_QK
    weights: dict[str, torch.Tensor] = {}
    with tensor_progress(progress, len(todo), f.name) as advance:
        for tensor, name in todo:
            w = torch.from_numpy(dequantize_tensor(f, tensor)).to(dtype)
            if permuted and ".self_attn.q_proj." in name:
                w = _unpermute(w, config.num_heads)
            elif permuted and ".self_attn.k_proj." in name:
                w = _unpermute(w, config.num_kv_heads)
            weights[name] = w.contiguous() if shard is None else shard.take(name, w, config)
            advance()
    return weights


# ---------------------------------------------------------------------------------------------


def load_gguf(path: Path, dtype: torch.dtype = torch.float32, progress: bool = False,
              shard: TensorShard | None = None) -> LoadedModel:
    start = time.perf_counter()
    f = GGUFFile(path)
    config = _model_config(f)
    tokenizer = tokenizer_from_gguf(f)
    todo = _used_tensors(f, config)
    weight_bytes = sum(t.n_elements for t, _ in todo) * torch.empty((), dtype=dtype).element_size()
    checks.check_fits(f.name, config, _config_keys(f).max_position_embeddings, weight_bytes,
                      str(dtype).removeprefix("torch."))
    if shard is not None:  # the cache holds whole tensors: a rank reads its part from the file
        shard.check(config)
        weights, source = _load_weights(f, todo, config, dtype, progress, shard), "GGUF tensors"
        check_shard_weights(weights, config, shard, f.name)
    else:
        weights = weight_cache.load(path, dtype)
        source = "the dequantized-weight cache" if weights is not None else "GGUF tensors"
        if weights is None:
            weights = _load_weights(f, todo, config, dtype, progress)
        check_weights(weights, config, f.name)
        if source == "GGUF tensors":
            weight_cache.store(path, dtype, weights)
    info = _info(f)
    generation_config: dict[str, Any] = {}
    if tokenizer is not None:
        generation_config = {"bos_token_id": tokenizer.bos_token_id,
                             "eos_token_id": list(tokenizer.eos_token_ids)}
    logger.info("loaded %s (%s, %s) from %s in %.2f s", path.name, config.architecture,
                info.quantization, source, time.perf_counter() - start)
    return LoadedModel(config=config, weights=weights, tokenizer=tokenizer, info=info,
                       generation_config=generation_config)

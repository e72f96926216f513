"""Encoder (embedding) models: a file -> `LoadedEncoder` (config, weights, tokenizer, pooling).

Two sources, as for decoders:

- a Hugging Face directory: config.json (BertModel, or nomic-bert in either of its config
  dialects), model.safetensors, tokenizer.json; and, when the directory is a
  sentence-transformers model, modules.json with its Pooling module's config
  (``1_Pooling/config.json``: mean / CLS / last token), a Normalize module, and
  sentence_bert_config.json's ``max_seq_length``;
- a llama.cpp GGUF file of architecture ``bert`` or ``nomic-bert`` (`gguf_encoder.py`).

Weights come back under BertModel names (`pagedserve.models.bert.encoder_weight_names`):
nomic's fused ``attn.Wqkv`` is split into query/key/value, ``fc11``/``fc12``/``fc2`` become
up/gate/down. Failures raise `ModelLoadError` naming what was found.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import torch

from pagedserve.loader.formats import LoadFormat, resolve_path
from pagedserve.loader.loaded_encoder import (
    GGUF_ARCHITECTURES,
    LoadedEncoder,
    check_encoder_weights,
)
from pagedserve.loader.loaded_model import ModelLoadError
from pagedserve.models.bert import EncoderConfig
from pagedserve.models.pooling import PoolingType

logger = logging.getLogger(__name__)

# config.json's architectures[0] or model_type -> our architecture name (llama.cpp's)
_HF_ARCHITECTURES = {"BertModel": "bert", "BertForMaskedLM": "bert",
                     "NomicBertModel": "nomic-bert", "NomicBertForPreTraining": "nomic-bert"}
_HF_MODEL_TYPES = {"bert": "bert", "nomic_bert": "nomic-bert"}

_ST_POOLING = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
               "pooling_mode_lasttoken": "last"}
_ST_MODULES_SERVED = ("Transformer", "Pooling", "Normalize")


def encoder_architecture(path: str | Path, load_format: LoadFormat = "auto") -> str | None:
    """"bert" or "nomic-bert" when `path` holds an encoder this module loads, else None
    (a decoder, or anything else): reads config.json or the GGUF header only."""
    path, fmt = resolve_path(path, load_format)
    if fmt == "gguf":
        from pagedserve.loader.gguf import GGUFFile

        arch = GGUFFile(path).get("general.architecture")
        return arch if arch in GGUF_ARCHITECTURES else None
    if fmt != "safetensors":
        return None
    from pagedserve.loader.hf import read_config_json

    return _hf_architecture(read_config_json(path))


def load_encoder(path: str | Path, load_format: LoadFormat = "auto",
                 dtype: torch.dtype = torch.float32) -> LoadedEncoder:
    """Config, weights (as `dtype`), tokenizer and pooling of the encoder at `path`."""
    start = time.perf_counter()
    path, fmt = resolve_path(path, load_format)
    if fmt == "gguf":
        from pagedserve.loader.gguf_encoder import load_gguf_encoder

        loaded = load_gguf_encoder(path, dtype)
    elif fmt == "safetensors":
        loaded = _load_hf_encoder(path, dtype)
    else:
        raise ModelLoadError(f"load_format {fmt!r} has no encoder models")
    logger.info("loaded encoder %s (%s, %s pooling) in %.2f s", path.name,
                loaded.config.architecture, loaded.pooling, time.perf_counter() - start)
    return loaded


# ---------------------------------------------------------------------------------------------
# config.json


def _hf_architecture(raw: dict[str, Any]) -> str | None:
    names = raw.get("architectures") or []
    if names:  # BertForSequenceClassification (a reranker) and the like are not embedders
        return _HF_ARCHITECTURES.get(names[0])
    return _HF_MODEL_TYPES.get(raw.get("model_type"))


def encoder_config_from_hf(raw: dict[str, Any], source: str = "config.json") -> EncoderConfig:
    """EncoderConfig from config.json: BertModel's, transformers' NomicBertModel's, or the
    original nomic-bert dialect (n_embd, n_layer, n_head, n_inner, rotary_emb_base, ...)."""
    arch = _hf_architecture(raw)
    if arch is None:
        found = (raw.get("architectures") or [raw.get("model_type")])[0]
        raise ModelLoadError(f"unsupported encoder architecture {found!r} in {source}; "
                             f"supported: {', '.join(sorted(_HF_ARCHITECTURES))}")

    def first(*keys: str, default: Any = None) -> Any:
        for key in keys:
            if raw.get(key) is not None:
                return raw[key]
        if default is None:
            raise ModelLoadError(f"{source} has no {keys[0]!r}")
        return default

    try:
        if arch == "bert":
            if raw.get("position_embedding_type", "absolute") != "absolute":
                raise ModelLoadError(f"{source}: position_embedding_type "
                                     f"{raw['position_embedding_type']!r} is not supported")
            act = {"gelu": "gelu", "gelu_new": "gelu_tanh",
                   "gelu_pytorch_tanh": "gelu_tanh"}.get(raw.get("hidden_act", "gelu"))
            if act is None:
                raise ModelLoadError(f"{source}: hidden_act {raw['hidden_act']!r} is not "
                                     "supported (gelu, gelu_new, gelu_pytorch_tanh)")
            return EncoderConfig(
                architecture="bert",
                vocab_size=int(first("vocab_size")),
                hidden_size=int(first("hidden_size")),
                intermediate_size=int(first("intermediate_size")),
                num_layers=int(first("num_hidden_layers")),
                num_heads=int(first("num_attention_heads")),
                max_position_embeddings=int(first("max_position_embeddings")),
                type_vocab_size=int(raw.get("type_vocab_size", 2)),
                layer_norm_eps=float(raw.get("layer_norm_eps", 1e-12)),
                hidden_act=act,
            )
        _check_nomic_variant(raw, source)
        rope = raw.get("rope_parameters") or {}
        return EncoderConfig(
            architecture="nomic-bert",
            vocab_size=int(first("vocab_size")),
            hidden_size=int(first("hidden_size", "n_embd")),
            intermediate_size=int(first("intermediate_size", "n_inner")),
            num_layers=int(first("num_hidden_layers", "n_layer")),
            num_heads=int(first("num_attention_heads", "n_head")),
            # nomic-embed-text v1/v1.5 say n_positions 8192 but were trained on 2048
            # (max_trained_positions), which llama.cpp's converter writes as the context
            max_position_embeddings=int(first("max_trained_positions",
                                              "max_position_embeddings", "n_positions")),
            type_vocab_size=int(raw.get("type_vocab_size", 2)),
            layer_norm_eps=float(first("layer_norm_eps", "layer_norm_epsilon", default=1e-12)),
            hidden_act="silu",
            rope_theta=float(rope.get("rope_theta") or first("rope_theta", "rotary_emb_base",
                                                             default=1000.0)),
        )
    except ValueError as exc:
        raise ModelLoadError(f"{source}: {exc}") from exc


def _check_nomic_variant(raw: dict[str, Any], source: str) -> None:
    """The original nomic-bert config names variants we do not implement; refuse them rather
    than compute something else (llama.cpp's converter refuses the same ones)."""
    expected = {"prenorm": False, "rotary_emb_interleaved": False, "rotary_emb_fraction": 1.0,
                "qkv_proj_bias": False, "mlp_fc1_bias": False, "mlp_fc2_bias": False,
                "rotary_emb_scale_base": None, "moe_every_n_layers": None}
    for key, value in expected.items():
        if key in raw and raw[key] != value and not (key == "moe_every_n_layers"
                                                     and not raw[key]):
            raise ModelLoadError(f"{source}: {key}={raw[key]!r} is not supported "
                                 f"(only {value!r})")
    act = raw.get("activation_function", raw.get("hidden_act", "swiglu"))
    if act not in ("swiglu", "silu"):
        raise ModelLoadError(f"{source}: activation {act!r} is not supported (swiglu)")


# ---------------------------------------------------------------------------------------------
# Weights

# nomic-bert checkpoint names -> BertModel names ({i}: layer); Wqkv is split separately
_NOMIC_NAMES = {
    "emb_ln.weight": "embeddings.LayerNorm.weight",
    "emb_ln.bias": "embeddings.LayerNorm.bias",
    "encoder.layers.{i}.attn.out_proj.weight": "encoder.layer.{i}.attention.output.dense.weight",
    "encoder.layers.{i}.norm1.weight": "encoder.layer.{i}.attention.output.LayerNorm.weight",
    "encoder.layers.{i}.norm1.bias": "encoder.layer.{i}.attention.output.LayerNorm.bias",
    "encoder.layers.{i}.mlp.fc11.weight": "encoder.layer.{i}.intermediate.dense.weight",
    "encoder.layers.{i}.mlp.fc12.weight": "encoder.layer.{i}.intermediate.gate.weight",
    "encoder.layers.{i}.mlp.fc2.weight": "encoder.layer.{i}.output.dense.weight",
    "encoder.layers.{i}.norm2.weight": "encoder.layer.{i}.output.LayerNorm.weight",
    "encoder.layers.{i}.norm2.bias": "encoder.layer.{i}.output.LayerNorm.bias",
}
_NOMIC_PATTERNS = [(re.compile("^" + re.escape(src).replace(r"\{i\}", r"(\d+)") + "$"), dst)
                   for src, dst in _NOMIC_NAMES.items()]
_QKV = ("query", "key", "value")


def bert_names(name: str, tensor: torch.Tensor, architecture: str
               ) -> list[tuple[str, torch.Tensor]]:
    """A checkpoint tensor under BertModel names (nomic's Wqkv gives three); [] for tensors
    an encoder does not use (pooler, MLM head, position_ids buffers)."""
    for prefix in ("bert.", "model."):
        name = name.removeprefix(prefix)
    if architecture == "nomic-bert":
        match = re.fullmatch(r"encoder\.layers\.(\d+)\.attn\.Wqkv\.weight", name)
        if match:
            p = f"encoder.layer.{match.group(1)}.attention.self."
            return [(p + part + ".weight", t) for part, t in zip(_QKV, tensor.chunk(3),
                                                                  strict=True)]
        for pattern, dst in _NOMIC_PATTERNS:
            match = pattern.match(name)
            if match:
                return [(dst.format(i=match.group(1)) if match.groups() else dst, tensor)]
    if name.startswith(("embeddings.", "encoder.layer.")) and not name.endswith("position_ids"):
        return [(name, tensor)]
    return []


def _load_hf_weights(path: Path, config: EncoderConfig, dtype: torch.dtype
                     ) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    from pagedserve.loader.hf import _weight_files

    weights: dict[str, torch.Tensor] = {}
    for file in _weight_files(path):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    for ours, tensor in bert_names(name, f.get_tensor(name), config.architecture):
                        weights[ours] = tensor.to(dtype)
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(f"{file} is corrupt or truncated: {exc}") from exc
    check_encoder_weights(weights, config, path.name)
    return weights


# ---------------------------------------------------------------------------------------------
# sentence-transformers modules


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{file} is not valid JSON: {exc}") from exc


def sentence_transformers_head(path: Path, default_pooling: PoolingType
                               ) -> tuple[PoolingType, bool]:
    """(pooling, normalize) from modules.json and its Pooling module's config; the default
    pooling and no normalization when the directory is not a sentence-transformers model."""
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return default_pooling, False
    modules = _read_json(modules_file)
    pooling, normalize = default_pooling, False
    for module in modules if isinstance(modules, list) else []:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind not in _ST_MODULES_SERVED:
            raise ModelLoadError(f"{modules_file}: module {module.get('type')!r} is not "
                                 f"supported (only {', '.join(_ST_MODULES_SERVED)})")
        if kind == "Normalize":
            normalize = True
        elif kind == "Pooling":
            config_file = path / str(module.get("path", "")) / "config.json"
            pooling = _st_pooling(_read_json(config_file), config_file) \
                if config_file.is_file() else pooling
    return pooling, normalize


def _st_pooling(config: dict[str, Any], source: Path) -> PoolingType:
    chosen = [mode for key, mode in _ST_POOLING.items() if config.get(key)]
    others = [key for key, value in config.items()
              if key.startswith("pooling_mode_") and value and key not in _ST_POOLING]
    if others or len(chosen) != 1:
        raise ModelLoadError(f"{source}: pooling {', '.join(others) or chosen or 'none'} is not "
                             "supported (exactly one of mean, cls, last token)")
    return chosen[0]  # type: ignore[return-value]


def _max_seq_length(path: Path) -> int | None:
    file = path / "sentence_bert_config.json"
    if not file.is_file():
        return None
    value = _read_json(file).get("max_seq_length")
    return int(value) if isinstance(value, int) and value > 0 else None


def _load_hf_encoder(path: Path, dtype: torch.dtype) -> LoadedEncoder:
    from pagedserve.loader.hf import load_hf_tokenizer, read_config_json, read_hf_info

    raw = read_config_json(path)
    config = encoder_config_from_hf(raw, source=str(path / "config.json"))
    weights = _load_hf_weights(path, config, dtype)
    tokenizer = load_hf_tokenizer(path, model_config=raw)
    if tokenizer is None:
        raise ModelLoadError(f"{path} has no tokenizer.json; an encoder needs its tokenizer")
    pooling, normalize = sentence_transformers_head(path, default_pooling="mean")
    max_tokens = min(_max_seq_length(path) or config.max_position_embeddings,
                     config.max_position_embeddings)
    return LoadedEncoder(config, weights, tokenizer, pooling, normalize, max_tokens,
                         read_hf_info(path))

"""Hugging Face model directories: config.json, *.safetensors (sharded or not), tokenizer files.

Both config.json dialects are read: transformers 4 (`rope_theta`, `rope_scaling`) and
transformers 5 (`rope_parameters`, holding rope_theta and the scaling together).
"""

from __future__ import annotations

import json
import logging
import struct
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from pagedserve.config import ModelConfig
from pagedserve.loader import (
    LoadedModel,
    ModelInfo,
    ModelLoadError,
    check_weights,
    expected_weight_names,
    tensor_progress,
)
from pagedserve.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
}
_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
_SAFETENSORS_DTYPES = {"F32": "F32", "F16": "F16", "BF16": "BF16", "F64": "F64"}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with path.open(encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} does not hold a JSON object")
    return data


def read_config_json(path: Path) -> dict[str, Any]:
    config_path = path / "config.json" if path.is_dir() else path
    if not config_path.is_file():
        raise ModelLoadError(f"{path} has no config.json")
    return _read_json(config_path)


def model_config_from_hf(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """ModelConfig from a config.json dict; ModelLoadError names what is missing or unknown."""
    names = raw.get("architectures") or []
    arch_name = names[0] if names else raw.get("model_type")
    if names:
        architecture = _ARCHITECTURES.get(arch_name)
    else:
        architecture = _MODEL_TYPES.get(arch_name)
    if architecture is None:
        raise ModelLoadError(
            f"unsupported architecture {arch_name!r} in {source}; "
            f"supported: {', '.join(sorted(_ARCHITECTURES))}"
        )
    try:
        hidden = int(raw["hidden_size"])
        num_heads = int(raw["num_attention_heads"])
        rope = raw.get("rope_parameters") or {}
        scaling = raw.get("rope_scaling") or {k: v for k, v in rope.items() if k != "rope_theta"}
        return ModelConfig(
            architecture=architecture,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
            head_dim=int(raw.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(raw.get("rope_theta") or rope.get("rope_theta") or 10000.0),
            rope_scaling=_normalize_rope_scaling(scaling),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=architecture == "qwen2" or bool(raw.get("attention_bias", False)),
        )
    except KeyError as exc:
        raise ModelLoadError(f"{source} has no {exc.args[0]!r}") from exc
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"{source}: {exc}") from exc


def _normalize_rope_scaling(scaling: dict[str, Any] | None) -> dict[str, Any] | None:
    """HF form with a "rope_type" key; None for plain RoPE."""
    if not scaling:
        return None
    scaling = dict(scaling)
    kind = scaling.pop("type", None)
    scaling.setdefault("rope_type", kind)
    if scaling["rope_type"] in (None, "default"):
        return None
    return scaling


# ---------------------------------------------------------------------------------------------
# safetensors


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"{index} has no weight_map")
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        for file in files:
            if not file.is_file():
                raise ModelLoadError(f"{index} names shard {file.name}, which is missing")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        if list(path.glob("*.bin")) or list(path.glob("*.pt")):
            raise ModelLoadError(f"{path} has only PyTorch .bin weights; convert them to safetensors")
        raise ModelLoadError(f"{path} has no *.safetensors weight files")
    return files


def _safetensors_header(file: Path) -> dict[str, Any]:
    """The JSON header (tensor name -> dtype, shape, offsets), without touching the data."""
    with file.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ModelLoadError(f"{file} is truncated (no safetensors header)")
        (size,) = struct.unpack("<Q", raw)
        if size > 100_000_000:
            raise ModelLoadError(f"{file} is not a safetensors file (header size {size})")
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"{file} has a corrupt safetensors header: {exc}") from exc
    header.pop("__metadata__", None)
    return header


def _load_safetensors(
    files: list[Path], config: ModelConfig, dtype: torch.dtype, progress: bool
) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    wanted = set(expected_weight_names(config))
    headers = {file: _safetensors_header(file) for file in files}
    total = sum(1 for h in headers.values() for name in h if name in wanted)
    weights: dict[str, torch.Tensor] = {}
    with tensor_progress(progress, total, files[0].parent.name) as advance:
        for file in files:
            try:
                with safe_open(str(file), framework="pt") as f:
                    for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                        if name in wanted:
                            weights[name] = f.get_tensor(name).to(dtype)
                            advance()
            except (SafetensorError, OSError) as exc:
                raise ModelLoadError(f"{file} is corrupt or truncated: {exc}") from exc
    check_weights(weights, config, files[0].parent.name)
    return weights


# ---------------------------------------------------------------------------------------------
# Tokenizer and generation config


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _chat_template(path: Path, tokenizer_config: dict[str, Any]) -> str | None:
    """chat_template.jinja beside the tokenizer wins (newer repos), then chat_template.json,
    then tokenizer_config.json; a list of named templates yields the "default" one."""
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template")
    json_file = path / "chat_template.json"
    if template is None and json_file.is_file():
        template = _read_json(json_file).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


def load_hf_tokenizer(path: Path, generation_config: dict[str, Any] | None = None,
                      model_config: dict[str, Any] | None = None) -> Tokenizer | None:
    """Tokenizer from tokenizer.json (+ tokenizer_config.json); None when the directory has
    no tokenizer.json."""
    from tokenizers import Tokenizer as Backend

    tokenizer_file = path / "tokenizer.json"
    if not tokenizer_file.is_file():
        if (path / "tokenizer.model").is_file():
            logger.warning("%s has only a SentencePiece tokenizer.model; no tokenizer loaded", path)
        return None
    try:
        backend = Backend.from_file(str(tokenizer_file))
    except Exception as exc:  # the tokenizers library raises plain Exception on bad files
        raise ModelLoadError(f"{tokenizer_file} cannot be read: {exc}") from exc
    config_file = path / "tokenizer_config.json"
    tokenizer_config = _read_json(config_file) if config_file.is_file() else {}
    generation_config = generation_config or {}
    model_config = model_config or {}

    special_tokens = {
        name: _token_text(tokenizer_config.get(name))
        for name in ("bos_token", "eos_token", "unk_token", "pad_token")
    }
    bos_text = special_tokens["bos_token"]
    bos_id = backend.token_to_id(bos_text) if bos_text else None
    if bos_id is None:
        bos_id = generation_config.get("bos_token_id", model_config.get("bos_token_id"))
    eos_text = special_tokens["eos_token"]
    eos_ids = [backend.token_to_id(eos_text)] if eos_text else []
    eos_ids += _as_id_list(generation_config.get("eos_token_id"))
    if not eos_ids:
        eos_ids = _as_id_list(model_config.get("eos_token_id"))
    eos_ids = [i for i in eos_ids if i is not None]

    add_bos = tokenizer_config.get("add_bos_token")
    if add_bos is None:
        # No flag: does the tokenizer.json post-processor prepend BOS?
        with_specials = backend.encode("a", add_special_tokens=True).ids
        add_bos = bos_id is not None and bool(with_specials) and with_specials[0] == bos_id
    return Tokenizer(
        backend,
        bos_token_id=bos_id,
        eos_token_ids=eos_ids,
        add_bos=bool(add_bos),
        chat_template=_chat_template(path, tokenizer_config),
        special_tokens=special_tokens,
    )


def read_generation_config(path: Path) -> dict[str, Any]:
    file = path / "generation_config.json"
    return _read_json(file) if file.is_file() else {}


# ---------------------------------------------------------------------------------------------


def read_hf_info(path: Path) -> ModelInfo:
    raw = read_config_json(path)
    files = _weight_files(path)
    dtype_counts: Counter[str] = Counter()
    parameters = 0
    for file in files:
        for entry in _safetensors_header(file).values():
            count = 1
            for dim in entry.get("shape", []):
                count *= int(dim)
            parameters += count
            dtype_counts[entry.get("dtype", "?")] += count
    dominant = dtype_counts.most_common(1)[0][0] if dtype_counts else "?"
    names = raw.get("architectures") or [raw.get("model_type", "?")]
    return ModelInfo(
        path=path,
        format="safetensors",
        quantization=_SAFETENSORS_DTYPES.get(dominant, dominant),
        family=str(raw.get("model_type", "?")),
        architecture=str(names[0]),
        parameter_count=parameters,
        context_length=int(raw.get("max_position_embeddings", 0)),
        file_size=sum(f.stat().st_size for f in files),
        metadata=raw,
    )


def load_hf_dir(path: Path, dtype: torch.dtype = torch.float32, progress: bool = False) -> LoadedModel:
    start = time.perf_counter()
    if not path.is_dir():
        raise ModelLoadError(f"model directory does not exist: {path}")
    raw = read_config_json(path)
    config = model_config_from_hf(raw, source=str(path / "config.json"))
    files = _weight_files(path)
    # A config that says "untied" while the checkpoint has no lm_head is tied in effect.
    names = {name for file in files for name in _safetensors_header(file)}
    if not config.tie_word_embeddings and "lm_head.weight" not in names:
        config.tie_word_embeddings = True
    weights = _load_safetensors(files, config, dtype, progress)
    generation_config = read_generation_config(path)
    tokenizer = load_hf_tokenizer(path, generation_config, raw)
    info = read_hf_info(path)
    logger.info("loaded %s (%s, %s) in %.2f s", path.name, config.architecture,
                info.quantization, time.perf_counter() - start)
    return LoadedModel(config=config, weights=weights, tokenizer=tokenizer, info=info,
                       generation_config=generation_config)

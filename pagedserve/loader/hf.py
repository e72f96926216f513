"""Hugging Face model directories: config.json, *.safetensors (sharded or not), tokenizer files.

Both config.json dialects are read: transformers 4 (`rope_theta`, `rope_scaling`) and
transformers 5 (`rope_parameters`, holding rope_theta and the scaling together).
"""

from __future__ import annotations

import json
import logging
import math
import struct
import time
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

import torch

from pagedserve.config import ModelConfig
from pagedserve.loader import checks
from pagedserve.loader.checks import check_shard_weights, check_weights, expected_weight_names
from pagedserve.loader.loaded_model import LoadedModel, ModelInfo, ModelLoadError, tensor_progress
from pagedserve.parallel.tensor_shard import TensorShard
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


_CONFIG_KEYS = checks.ConfigKeys(
    vocab_size="vocab_size", hidden_size="hidden_size", intermediate_size="intermediate_size",
    num_layers="num_hidden_layers", num_heads="num_attention_heads",
    num_kv_heads="num_key_value_heads", head_dim="head_dim", rms_norm_eps="rms_norm_eps",
    rope_theta="rope_theta", rope_scaling="rope_scaling",
    max_position_embeddings="max_position_embeddings",
)


def model_config_from_hf(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """ModelConfig from a config.json dict; ModelLoadError names what is missing, unknown or
    out of range (checks.py)."""
    names = raw.get("architectures") or []
    if not isinstance(names, list):
        raise ModelLoadError(f"{source}: architectures must be a list, found "
                             f"{checks.describe(names)}")
    arch_name = names[0] if names else raw.get("model_type")
    if names:
        architecture = _ARCHITECTURES.get(arch_name) if isinstance(arch_name, str) else None
    else:
        architecture = _MODEL_TYPES.get(arch_name) if isinstance(arch_name, str) else None
    if architecture is None:
        raise ModelLoadError(
            f"unsupported architecture {arch_name!r} in {source}; "
            f"supported: {', '.join(sorted(_ARCHITECTURES))}"
        )

    def required(key: str) -> Any:
        if key not in raw:
            raise ModelLoadError(f"{source} has no {key!r}")
        return raw[key]

    rope = raw.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ModelLoadError(f"{source}: rope_parameters must be an object, found "
                             f"{checks.describe(rope)}")
    scaling = raw.get("rope_scaling") or {k: v for k, v in rope.items() if k != "rope_theta"}
    if not isinstance(scaling, dict):
        raise ModelLoadError(f"{source}: rope_scaling must be an object, found "
                             f"{checks.describe(scaling)}")
    return checks.checked_config(
        source, _CONFIG_KEYS,
        architecture=architecture,
        vocab_size=required("vocab_size"),
        hidden_size=required("hidden_size"),
        intermediate_size=required("intermediate_size"),
        num_layers=required("num_hidden_layers"),
        num_heads=required("num_attention_heads"),
        num_kv_heads=raw.get("num_key_value_heads"),
        head_dim=raw.get("head_dim"),
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=raw.get("rope_theta") or rope.get("rope_theta") or 10000.0,
        rope_scaling=_normalize_rope_scaling(scaling),
        max_position_embeddings=raw.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=architecture == "qwen2" or bool(raw.get("attention_bias", False)),
    )


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


class _Entry(NamedTuple):
    dtype: str
    shape: tuple[int, ...]


def _safetensors_header(file: Path) -> dict[str, _Entry]:
    """Tensor name -> dtype and shape, from the JSON header, without touching the data."""
    with file.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ModelLoadError(f"{file} is truncated (no safetensors header)")
        (size,) = struct.unpack("<Q", raw)
        if size > 100_000_000:
            raise ModelLoadError(f"{file} is not a safetensors file (header size {size})")
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise ModelLoadError(f"{file} has a corrupt safetensors header: "
                                 f"{str(exc)[:200]}") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{file} has a corrupt safetensors header: not a JSON object")
    header.pop("__metadata__", None)
    entries = {}
    for name, entry in header.items():
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not isinstance(dtype, str) or not isinstance(shape, list) or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ModelLoadError(f"{file} has a corrupt safetensors header: tensor {name!r} "
                                 "has no dtype and shape")
        entries[name] = _Entry(dtype, tuple(shape))
    return entries


def _checked_config(path: Path, raw: dict[str, Any],
                    headers: dict[Path, dict[str, _Entry]]) -> ModelConfig:
    """The config, checked (checks.py) and against the tensors the headers list."""
    config = model_config_from_hf(raw, source=str(path / "config.json"))
    shapes = {name: entry.shape for header in headers.values() for name, entry in header.items()}
    # A config that says "untied" while the checkpoint has no lm_head is tied in effect.
    if not config.tie_word_embeddings and "lm_head.weight" not in shapes:
        config.tie_word_embeddings = True
    checks.check_layer_count(path.name, _CONFIG_KEYS.num_layers, config.num_layers, len(shapes))
    checks.check_weight_shapes(path.name, config, shapes)
    return config


def _load_safetensors(
    headers: dict[Path, dict[str, _Entry]], config: ModelConfig, dtype: torch.dtype,
    progress: bool, shard: TensorShard | None = None,
) -> dict[str, torch.Tensor]:
    """`shard`: only that rank's rows or columns of each tensor are read from the file."""
    from safetensors import SafetensorError, safe_open

    files = list(headers)
    wanted = set(expected_weight_names(config))
    total = sum(1 for h in headers.values() for name in h if name in wanted)
    weights: dict[str, torch.Tensor] = {}
    with tensor_progress(progress, total, files[0].parent.name) as advance:
        for file in files:
            try:
                with safe_open(str(file), framework="pt") as f:
                    for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                        if name in wanted:
                            weights[name] = _read(f, name, config, shard).to(dtype)
                            advance()
            except (SafetensorError, OSError) as exc:
                raise ModelLoadError(f"{file} is corrupt or truncated: {exc}") from exc
    if shard is None:
        check_weights(weights, config, files[0].parent.name)
    else:
        check_shard_weights(weights, config, shard, files[0].parent.name)
    return weights


def _read(f, name: str, config: ModelConfig, shard: TensorShard | None) -> torch.Tensor:
    if shard is None or (where := shard.slice_of(name, config)) is None:
        return f.get_tensor(name)
    dim, lo, hi = where
    part = f.get_slice(name)  # reads only the slice's bytes
    return part[lo:hi] if dim == 0 else part[:, lo:hi]


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


def _is_supported(raw: dict[str, Any]) -> bool:
    names = raw.get("architectures")
    if isinstance(names, list) and names:
        return isinstance(names[0], str) and names[0] in _ARCHITECTURES
    model_type = raw.get("model_type")
    return isinstance(model_type, str) and model_type in _MODEL_TYPES


def read_hf_info(path: Path) -> ModelInfo:
    """Metadata only; for an architecture we run, the config is checked as a load would."""
    raw = read_config_json(path)
    headers = {file: _safetensors_header(file) for file in _weight_files(path)}
    if _is_supported(raw):
        _checked_config(path, raw, headers)
    return _info(path, raw, headers)


def _info(path: Path, raw: dict[str, Any], headers: dict[Path, dict[str, _Entry]]) -> ModelInfo:
    dtype_counts: Counter[str] = Counter()
    parameters = 0
    for header in headers.values():
        for entry in header.values():
            count = math.prod(entry.shape)
            parameters += count
            dtype_counts[entry.dtype] += count
    dominant = dtype_counts.most_common(1)[0][0] if dtype_counts else "?"
    names = raw.get("architectures") or [raw.get("model_type", "?")]
    context = raw.get("max_position_embeddings")
    return ModelInfo(
        path=path,
        format="safetensors",
        quantization=_SAFETENSORS_DTYPES.get(dominant, dominant),
        family=str(raw.get("model_type", "?")),
        architecture=str(names[0]) if isinstance(names, list) else str(names),
        parameter_count=parameters,
        context_length=0 if context is None else checks.integer(
            str(path / "config.json"), "max_position_embeddings", context, 0, checks.MAX_CONTEXT),
        file_size=sum(f.stat().st_size for f in headers),
        metadata=raw,
    )


def load_hf_dir(path: Path, dtype: torch.dtype = torch.float32, progress: bool = False,
                shard: TensorShard | None = None) -> LoadedModel:
    start = time.perf_counter()
    if not path.is_dir():
        raise ModelLoadError(f"model directory does not exist: {path}")
    raw = read_config_json(path)
    headers = {file: _safetensors_header(file) for file in _weight_files(path)}
    config = _checked_config(path, raw, headers)
    wanted = set(expected_weight_names(config))
    elements = sum(math.prod(e.shape) for h in headers.values() for name, e in h.items()
                   if name in wanted)
    checks.check_fits(path.name, config, _CONFIG_KEYS.max_position_embeddings,
                      elements * torch.empty((), dtype=dtype).element_size(),
                      str(dtype).removeprefix("torch."))
    if shard is not None:
        shard.check(config)
    weights = _load_safetensors(headers, config, dtype, progress, shard)
    generation_config = read_generation_config(path)
    tokenizer = load_hf_tokenizer(path, generation_config, raw)
    info = _info(path, raw, headers)
    logger.info("loaded %s (%s, %s) in %.2f s", path.name, config.architecture,
                info.quantization, time.perf_counter() - start)
    return LoadedModel(config=config, weights=weights, tokenizer=tokenizer, info=info,
                       generation_config=generation_config)

"""llama.cpp GGUF encoders (``bert``, ``nomic-bert``): metadata, tensors, WordPiece tokenizer.

The header is parsed and tensors dequantized by `gguf.py`'s `GGUFFile`; this module maps
llama.cpp's names onto BertModel's and rebuilds the tokenizer:

======================================= ================================================
GGUF                                    BertModel (`pagedserve.models.bert`)
======================================= ================================================
token_embd, token_types, position_embd  embeddings.word/token_type/position_embeddings
token_embd_norm                         embeddings.LayerNorm
blk.N.attn_q / attn_k / attn_v          encoder.layer.N.attention.self.query/key/value
blk.N.attn_qkv (nomic-bert: fused)      the same, rows split in thirds (q, k, v)
blk.N.attn_output, attn_output_norm     attention.output.dense, attention.output.LayerNorm
blk.N.ffn_up, ffn_gate, ffn_down        intermediate.dense, intermediate.gate, output.dense
blk.N.layer_output_norm                 output.LayerNorm
======================================= ================================================

Neither architecture's q/k rows are permuted by the converter (nomic-bert's rotary is
llama.cpp's NeoX kind, halves rotated, as in the checkpoint).

The tokenizer (``tokenizer.ggml.model = "bert"``) is WordPiece written in llama.cpp's
"phantom space" spelling: a word-initial piece ``the`` is stored as ``▁the``, a continuation
``##ing`` as ``ing``, control tokens ([CLS], [SEP], ...) unchanged. We spell them back and
build BERT's pipeline (BertNormalizer, BertPreTokenizer, WordPiece, ``[CLS] $A [SEP]``).
The metadata does not say whether the model lowercases (llama.cpp always does): a vocabulary
whose word pieces include capitals is taken as cased, one without as uncased.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from pagedserve.loader.gguf import GGUFFile, _from_f32, dequantize_tensor, read_gguf_info
from pagedserve.loader.loaded_encoder import (
    GGUF_ARCHITECTURES,
    LoadedEncoder,
    check_encoder_weights,
)
from pagedserve.loader.loaded_model import ModelLoadError
from pagedserve.models.bert import EncoderConfig
from pagedserve.models.pooling import GGUF_POOLING, PoolingType
from pagedserve.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

_GLOBAL_NAMES = {
    "token_embd.weight": "embeddings.word_embeddings.weight",
    "token_types.weight": "embeddings.token_type_embeddings.weight",
    "position_embd.weight": "embeddings.position_embeddings.weight",
    "token_embd_norm.weight": "embeddings.LayerNorm.weight",
    "token_embd_norm.bias": "embeddings.LayerNorm.bias",
}
_LAYER_NAMES = {
    "attn_q": "attention.self.query",
    "attn_k": "attention.self.key",
    "attn_v": "attention.self.value",
    "attn_output": "attention.output.dense",
    "attn_output_norm": "attention.output.LayerNorm",
    "ffn_up": "intermediate.dense",
    "ffn_gate": "intermediate.gate",
    "ffn_down": "output.dense",
    "layer_output_norm": "output.LayerNorm",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

# llama.cpp token types (see gguf.py)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED = 1, 2, 3, 4, 5
_PHANTOM_SPACE = "\u2581"
# a vocabulary is cased when more than this share of its word pieces hold a capital letter
_CASED_SHARE = 0.01


def _encoder_config(f: GGUFFile) -> EncoderConfig:
    arch = f.arch

    def required(suffix: str) -> Any:
        value = f.get(f.arch_key(suffix))
        if value is None:
            raise ModelLoadError(f"{f.path.name} has no {arch}.{suffix} in its metadata")
        return value

    if "token_embd.weight" not in f.tensors:
        raise ModelLoadError(f"{f.path.name} is missing tensor 'token_embd.weight'")
    vocab_size = int(f.tensors["token_embd.weight"].shape[1])  # GGUF dims: (H, V)
    types = f.tensors.get("token_types.weight")
    # llama.cpp's default base where a rotary model's file names none
    rotary = {"rope_theta": _from_f32(f.get(f.arch_key("rope.freq_base"), 10000.0))} \
        if arch == "nomic-bert" else {}
    try:
        return EncoderConfig(
            architecture=arch,
            vocab_size=vocab_size,
            hidden_size=int(required("embedding_length")),
            intermediate_size=int(required("feed_forward_length")),
            num_layers=int(required("block_count")),
            num_heads=int(required("attention.head_count")),
            max_position_embeddings=int(required("context_length")),
            type_vocab_size=int(types.shape[1]) if types is not None else 0,
            layer_norm_eps=_from_f32(f.get(f.arch_key("attention.layer_norm_epsilon"), 1e-12)),
            # llama.cpp's graph runs GELU for bert, SwiGLU (silu) for nomic-bert
            hidden_act="gelu" if arch == "bert" else "silu",
            **rotary,
        )
    except ValueError as exc:
        raise ModelLoadError(f"{f.path.name}: {exc}") from exc


def _pooling(f: GGUFFile) -> PoolingType:
    value = f.get(f.arch_key("pooling_type"))
    if value is None:
        logger.info("%s names no %s.pooling_type; pooling the mean", f.path.name, f.arch)
        return "mean"
    if int(value) not in GGUF_POOLING:
        raise ModelLoadError(f"{f.path.name}: {f.arch}.pooling_type {value} is not supported "
                             "(1 mean, 2 cls, 3 last)")
    return GGUF_POOLING[int(value)]  # type: ignore[return-value]


def _load_weights(f: GGUFFile, config: EncoderConfig, dtype: torch.dtype
                  ) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    skipped = []
    for tensor in f.tensors.values():
        match = _LAYER_TENSOR.fullmatch(tensor.name)
        if tensor.name in _GLOBAL_NAMES:
            names = [_GLOBAL_NAMES[tensor.name]]
        elif match and match.group(2) in _LAYER_NAMES:
            names = [f"encoder.layer.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}."
                     f"{match.group(3)}"]
        elif match and match.group(2) == "attn_qkv":
            p = f"encoder.layer.{match.group(1)}.attention.self."
            names = [f"{p}{part}.{match.group(3)}" for part in ("query", "key", "value")]
        else:
            skipped.append(tensor.name)
            continue
        w = torch.from_numpy(dequantize_tensor(f, tensor)).to(dtype)
        parts = w.chunk(3) if len(names) == 3 else [w]
        if len(names) == 3 and w.shape[0] != 3 * config.hidden_size:
            raise ModelLoadError(f"{f.path.name}: {tensor.name} has {w.shape[0]} rows, not "
                                 f"3 x {config.hidden_size}")
        for name, part in zip(names, parts, strict=True):
            weights[name] = part.contiguous()
    if skipped:
        logger.info("ignoring GGUF tensors an encoder does not use: %s", ", ".join(skipped[:8]))
    check_encoder_weights(weights, config, f.path.name)
    return weights


def wordpiece_from_gguf(f: GGUFFile) -> Tokenizer:
    """The WordPiece tokenizer of ``tokenizer.ggml.model = "bert"`` metadata."""
    from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import Tokenizer as Backend

    kind = f.get("tokenizer.ggml.model")
    if kind != "bert":
        raise ModelLoadError(f"{f.path.name}: tokenizer model {kind!r} is not supported for an "
                             "encoder (supported: bert, WordPiece)")
    tokens = f.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ModelLoadError(f"{f.path.name}: tokenizer.ggml.model is set but there are no tokens")
    types = f.get("tokenizer.ggml.token_type")
    types = [_NORMAL] * len(tokens) if types is None else [int(t) for t in types]
    vocab: dict[str, int] = {}
    control, user = [], []
    for i, (token, kind_id) in enumerate(zip(tokens, types, strict=True)):
        if kind_id in (_CONTROL, _UNKNOWN):
            piece = token
            control.append(piece)
        elif token.startswith(_PHANTOM_SPACE):
            piece = token[1:]
            if kind_id == _USER_DEFINED:
                user.append(piece)
        else:
            piece = "##" + token
        vocab.setdefault(piece, i)

    def token_id(key: str) -> int | None:
        value = f.get(f"tokenizer.ggml.{key}")
        return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

    unk = token_id("unknown_token_id")
    # the converter writes [CLS] as BOS (gguf-py's SpecialVocab: bos_token <- cls_token)
    cls = token_id("bos_token_id")
    sep = token_id("seperator_token_id")  # sic: llama.cpp's key
    sep = sep if sep is not None else token_id("eos_token_id")
    word_pieces = [p for p, i in vocab.items() if types[i] == _NORMAL]
    cased = sum(p != p.lower() for p in word_pieces) > _CASED_SHARE * max(len(word_pieces), 1)
    backend = Backend(models.WordPiece(vocab, unk_token=tokens[unk] if unk is not None else "[UNK]",
                                       continuing_subword_prefix="##",
                                       max_input_chars_per_word=100))
    backend.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                    strip_accents=None, lowercase=not cased)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    add_cls = bool(f.get("tokenizer.ggml.add_bos_token", True)) and cls is not None
    add_sep = bool(f.get("tokenizer.ggml.add_eos_token",
                         f.get("tokenizer.ggml.add_sep_token", True))) and sep is not None
    specials = [(tokens[i], i) for i, add in ((cls, add_cls), (sep, add_sep)) if add]
    single = " ".join(([f"{tokens[cls]}:0"] if add_cls else []) + ["$A:0"]
                      + ([f"{tokens[sep]}:0"] if add_sep else []))
    backend.post_processor = processors.TemplateProcessing(single=single, special_tokens=specials)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    backend.add_tokens([AddedToken(t, special=False, normalized=True) for t in user])
    names = {"cls_token": cls, "sep_token": sep, "unk_token": unk,
             "pad_token": token_id("padding_token_id"), "mask_token": token_id("mask_token_id")}
    return Tokenizer(backend, bos_token_id=None, eos_token_ids=[sep] if sep is not None else [],
                     add_bos=False,
                     special_tokens={k: tokens[i] if i is not None else None
                                     for k, i in names.items()})


def load_gguf_encoder(path: Path, dtype: torch.dtype = torch.float32) -> LoadedEncoder:
    f = GGUFFile(path)
    if f.arch not in GGUF_ARCHITECTURES:
        raise ModelLoadError(f"{path.name} is a {f.arch!r} model, not an encoder "
                             f"(supported: {', '.join(GGUF_ARCHITECTURES)})")
    config = _encoder_config(f)
    tokenizer = wordpiece_from_gguf(f)
    weights = _load_weights(f, config, dtype)
    return LoadedEncoder(config, weights, tokenizer, _pooling(f), normalize=True,
                         max_tokens=config.max_position_embeddings, info=read_gguf_info(path))

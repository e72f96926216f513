"""Tiny random embedding models on disk, for tests/test_embedding_*.py.

- a WordPiece tokenizer trained with the `tokenizers` library on a few sentences;
- a BERT (transformers' BertModel) or nomic-bert (transformers' NomicBertModel, saved under
  nomic's original tensor names) directory, with sentence-transformers' modules.json,
  1_Pooling/config.json, 2_Normalize and sentence_bert_config.json;
- the same weights as a GGUF file written the way llama.cpp's converter writes one: tensor
  names from gguf-py's own name map, the vocabulary in its "phantom space" spelling, special
  token ids from gguf-py's SpecialVocab.

Weights are drawn wider than transformers' init (std 0.02 leaves attention nearly uniform and
every text's embedding alike), so that a wrong attention, rotary or pooling shows.
"""

from __future__ import annotations

import json
from pathlib import Path

TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Paged attention keeps the KV cache in fixed-size blocks.",
    "Embeddings map text to vectors; similar texts map to nearby vectors.",
    "Café crème and naïve résumés: accents are stripped when lowercasing.",
    "日本語のテキストも、文字ごとに分けられる。",
    "Numbers like 12, 345 and 6789 appear in text.",
    "def add(a, b):\n    return a + b",
    "The cat sat on the mat. The dog sat on the log.",
    "An unseen word: xylophonist zygomorphic quixotry.",
    "UPPER CASE and MiXeD cAsE look the same to an uncased model.",
    "Emoji 😀 fall back to the unknown token.",
    "short",
    "a",
    "Retrieval-augmented generation searches documents by embedding similarity, then "
    "answers with the passages it found; long passages are cut to the model's context.",
    "Tabs\tand   repeated   spaces, and\nnew lines.",
    "Punctuation!!! (parentheses) [brackets] {braces} -- dashes... 'quotes' \"double\"",
]

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece(lowercase: bool = True):
    """A BERT-style WordPiece tokenizer (ids 0-4: [PAD] [UNK] [CLS] [SEP] [MASK])."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=400, special_tokens=SPECIALS,
                                        show_progress=False)
    # most words of TEXTS and more, so that texts mix whole words, pieces and [UNK]
    tok.train_from_iterator(TEXTS[:10] + ["the vectors of documents answer a search"] * 3,
                            trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tok


def _save_tokenizer(out: Path, lowercase: bool = True) -> int:
    tok = train_wordpiece(lowercase)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "BertTokenizer", "do_lower_case": lowercase, "cls_token": "[CLS]",
        "sep_token": "[SEP]", "unk_token": "[UNK]", "pad_token": "[PAD]",
        "mask_token": "[MASK]", "model_max_length": 512}))
    return tok.get_vocab_size()


def _save_sentence_transformers(out: Path, pooling: str, normalize: bool,
                                max_seq_length: int) -> None:
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
        (out / "2_Normalize").mkdir()
    (out / "modules.json").write_text(json.dumps(modules))
    (out / "1_Pooling").mkdir()
    modes = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token",
             "last": "pooling_mode_lasttoken"}
    config = {"word_embedding_dimension": json.loads((out / "config.json").read_text())[
        "hidden_size"], **{key: key == modes[pooling] for key in modes.values()},
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}
    (out / "1_Pooling" / "config.json").write_text(json.dumps(config))
    (out / "sentence_bert_config.json").write_text(json.dumps(
        {"max_seq_length": max_seq_length, "do_lower_case": False}))


def _widen(model, seed: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower():
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))


def save_bert_dir(out: Path, pooling: str = "mean", normalize: bool = True,
                  max_seq_length: int = 96, seed: int = 0) -> Path:
    """A random 2-layer BertModel as a sentence-transformers directory."""
    from transformers import BertConfig, BertModel

    out.mkdir(parents=True, exist_ok=True)
    vocab = _save_tokenizer(out)
    config = BertConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=128,
                        max_position_embeddings=128, type_vocab_size=2)
    model = BertModel(config, add_pooling_layer=False)
    _widen(model, seed)
    model.save_pretrained(out, safe_serialization=True)
    _save_sentence_transformers(out, pooling, normalize, max_seq_length)
    return out


def save_nomic_dir(out: Path, pooling: str = "mean", seed: int = 1) -> Path:
    """A random 2-layer nomic-bert (transformers' NomicBertModel, rotary base 1000, SwiGLU,
    no linear biases) as a sentence-transformers directory."""
    from transformers import NomicBertConfig, NomicBertModel

    out.mkdir(parents=True, exist_ok=True)
    vocab = _save_tokenizer(out)
    config = NomicBertConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2,
                             num_attention_heads=4, intermediate_size=96,
                             max_position_embeddings=128, type_vocab_size=2,
                             rope_parameters={"rope_type": "default", "rope_theta": 1000.0})
    model = NomicBertModel(config)
    _widen(model, seed)
    model.save_pretrained(out, safe_serialization=True)  # under nomic's original names
    _save_sentence_transformers(out, pooling, normalize=True, max_seq_length=128)
    return out


def write_encoder_gguf(model_dir: Path, path: Path, arch: str, pooling: str = "mean",
                       f16: bool = False) -> Path:
    """`model_dir`'s weights and tokenizer as llama.cpp's converter writes them (`arch`:
    "bert" or "nomic-bert"); matrices in F16 when `f16`."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    config = json.loads((model_dir / "config.json").read_text())
    state = load_file(str(model_dir / "model.safetensors"))
    n_layers = config["num_hidden_layers"]
    model_arch = {"bert": gguf.MODEL_ARCH.BERT, "nomic-bert": gguf.MODEL_ARCH.NOMIC_BERT}[arch]
    names = gguf.get_tensor_name_map(model_arch, n_layers)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(n_layers)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_layer_norm_eps(config["layer_norm_eps"])
    writer.add_causal_attention(False)
    writer.add_pooling_type({"mean": gguf.PoolingType.MEAN, "cls": gguf.PoolingType.CLS,
                             "last": gguf.PoolingType.LAST}[pooling])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.ALL_F32)
    if arch == "nomic-bert":
        writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])

    # the vocabulary, as the converter's BertModel.set_vocab spells it
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = sorted(tokenizer["model"]["vocab"].items(), key=lambda kv: kv[1])
    specials = {t["content"] for t in tokenizer["added_tokens"] if t["special"]}
    tokens, types = [], []
    for token, _ in vocab:
        control = token in specials
        types.append(gguf.TokenType.CONTROL if control else gguf.TokenType.NORMAL)
        tokens.append(token if control else token[2:] if token.startswith("##")
                      else "\u2581" + token)
    writer.add_token_type_count(config["type_vocab_size"])
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(model_dir, n_vocab=len(tokens)).add_to_gguf(writer)

    for hf_name, tensor in state.items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise KeyError(f"gguf-py maps no name for {hf_name}")
        data = np.ascontiguousarray(tensor, dtype=np.float32)
        if f16 and data.ndim == 2 and not name.startswith(("token_types", "position_embd")):
            data = data.astype(np.float16)
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path

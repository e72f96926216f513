"""Encoder embeddings (BERT, nomic-bert) from safetensors and GGUF, against the references.

The reference is sentence-transformers (tokenizer, transformers' BertModel / NomicBertModel,
Pooling, Normalize) on the same weights; the GGUF files are the same weights as llama.cpp's
converter writes them (tests/embedding_models.py).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from embedding_models import (
    TEXTS,
    save_bert_dir,
    save_nomic_dir,
    train_wordpiece,
    write_encoder_gguf,
)

from pagedserve.loader import ModelLoadError
from pagedserve.loader.encoder import encoder_architecture, encoder_config_from_hf, load_encoder
from pagedserve.models.bert import PackedBatch
from pagedserve.worker.embedder import Embedder


def _has_nomic_bert() -> bool:
    import transformers

    return hasattr(transformers, "NomicBertModel")


# transformers' own NomicBertModel (the nomic-bert reference) came with transformers 5
needs_nomic = pytest.mark.skipif(not _has_nomic_bert(),
                                 reason="this transformers has no NomicBertModel")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{name: path}: bert and nomic-bert directories and their GGUF files (nomic's in F16)."""
    root = tmp_path_factory.mktemp("encoders")
    bert = save_bert_dir(root / "bert")
    if not _has_nomic_bert():
        return {"bert": bert, "bert.gguf": write_encoder_gguf(bert, root / "bert.gguf", "bert")}
    nomic = save_nomic_dir(root / "nomic")
    return {"bert": bert, "nomic": nomic,
            "bert.gguf": write_encoder_gguf(bert, root / "bert.gguf", "bert"),
            "nomic.gguf": write_encoder_gguf(nomic, root / "nomic.gguf", "nomic-bert",
                                             f16=True)}


@pytest.fixture(scope="module")
def references(models):
    """{dir name: (SentenceTransformer, its embeddings of TEXTS)}."""
    from sentence_transformers import SentenceTransformer

    out = {}
    for name in ("bert", "nomic") if "nomic" in models else ("bert",):
        st = SentenceTransformer(str(models[name]), device="cpu")
        out[name] = (st, torch.from_numpy(st.encode(TEXTS, convert_to_numpy=True)))
    return out


@pytest.fixture(scope="module")
def embedders(models):
    return {name: Embedder.from_path(path) for name, path in models.items()}


@pytest.mark.parametrize("name", ["bert", "bert.gguf", pytest.param("nomic", marks=needs_nomic),
                                  pytest.param("nomic.gguf", marks=needs_nomic)])
def test_matches_sentence_transformers(name, embedders, references):
    embedder = embedders[name]
    st, expected = references[name.removesuffix(".gguf")]
    ids = embedder.tokenize(TEXTS)
    hf_ids = [st.tokenizer(t, truncation=True, max_length=st.max_seq_length)["input_ids"]
              for t in TEXTS]
    assert ids == hf_ids
    got = embedder.embed(ids)
    cos = F.cosine_similarity(got, expected)
    # F32 files agree to rounding; the F16 GGUF's weights are rounded to 11 bits
    assert cos.min() >= (0.999 if name == "nomic.gguf" else 0.99999), cos
    assert torch.allclose(got.norm(dim=1), torch.ones(len(TEXTS)), atol=1e-5)
    # the check can fail: different texts are far apart at this tolerance
    off_diagonal = expected @ expected.T - 2 * torch.eye(len(TEXTS))
    assert off_diagonal.max() < 0.999


@pytest.mark.parametrize("name", ["bert", pytest.param("nomic", marks=needs_nomic)])
def test_token_hidden_states_match_transformers(name, models, embedders, references):
    """Every token's final hidden state of a padded batch, not only the pooled vector: the
    packed batch's attention sees its own text alone."""
    st, _ = references[name]
    hf_model = st[0].auto_model.eval()
    ids = embedders[name].tokenize(TEXTS[:6])
    width = max(map(len, ids))
    padded = torch.tensor([x + [0] * (width - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    with torch.no_grad():
        expected = hf_model(input_ids=padded, attention_mask=mask).last_hidden_state
    got = embedders[name].model.encoder.forward(PackedBatch.of(ids))
    rows = torch.cat([expected[i, : len(x)] for i, x in enumerate(ids)])
    assert got.shape == rows.shape
    assert torch.allclose(got, rows, atol=1e-4), (got - rows).abs().max()


@needs_nomic
def test_gguf_weights_and_config_equal_the_directory(models):
    from_dir, from_gguf = load_encoder(models["bert"]), load_encoder(models["bert.gguf"])
    assert from_gguf.config == from_dir.config
    assert from_gguf.weights.keys() == from_dir.weights.keys()
    for name, w in from_dir.weights.items():
        assert torch.equal(from_gguf.weights[name], w), name
    nomic, nomic_gguf = load_encoder(models["nomic"]), load_encoder(models["nomic.gguf"])
    assert nomic_gguf.config.rope_theta == nomic.config.rope_theta == 1000.0
    assert nomic_gguf.config.architecture == "nomic-bert"
    assert nomic_gguf.weights.keys() == nomic.weights.keys()
    assert "encoder.layer.1.intermediate.gate.weight" in nomic.weights


def test_spec_from_the_files(models, embedders):
    bert, gguf = embedders["bert"].spec, embedders["bert.gguf"].spec
    # sentence_bert_config.json's max_seq_length cuts under the 128 positions
    assert (bert.architecture, bert.dimensions, bert.max_tokens,
            bert.max_position_embeddings, bert.pooling, bert.normalize) == (
        "bert", 64, 96, 128, "mean", True)
    assert (gguf.max_tokens, gguf.pooling) == (128, "mean")
    assert encoder_architecture(models["bert"]) == "bert"
    assert encoder_architecture(models["bert.gguf"]) == "bert"
    if "nomic" in models:
        assert embedders["nomic"].spec.architecture == "nomic-bert"
        assert encoder_architecture(models["nomic.gguf"]) == "nomic-bert"


def test_cls_pooling_without_normalize(tmp_path):
    """bge's head: CLS pooling; without a Normalize module the reference is not unit length."""
    from sentence_transformers import SentenceTransformer

    path = save_bert_dir(tmp_path / "cls", pooling="cls", normalize=False, seed=3)
    gguf_path = write_encoder_gguf(path, tmp_path / "cls.gguf", "bert", pooling="cls")
    expected = torch.from_numpy(SentenceTransformer(str(path), device="cpu").encode(TEXTS))
    for source in (path, gguf_path):
        embedder = Embedder.from_path(source)
        assert embedder.pooling == "cls"
        got = embedder.embed(embedder.tokenize(TEXTS), normalize=False)
        assert torch.allclose(got, expected, atol=1e-4), source
    assert not Embedder.from_path(path).spec.normalize


def test_pooling_override_changes_the_result(models, embedders, references):
    """The mean the model asks for is what the reference pools, not another pooling."""
    _, expected = references["bert"]
    ids = embedders["bert"].tokenize(TEXTS)
    cls = Embedder.from_path(models["bert"], pooling="cls")
    assert cls.pooling == "cls"
    assert F.cosine_similarity(cls.embed(ids), expected).min() < 0.99


@needs_nomic
def test_batch_equals_one_at_a_time(embedders):
    embedder = embedders["nomic"]
    ids = embedder.tokenize(TEXTS)
    batched = embedder.embed(ids)
    single = torch.cat([embedder.embed([x]) for x in ids])
    assert torch.allclose(batched, single, atol=1e-5)
    # a budget that splits the batch into several passes gives the same vectors
    embedder.max_batch_tokens, budget = 100, embedder.max_batch_tokens
    try:
        assert torch.allclose(embedder.embed(ids), batched, atol=1e-5)
    finally:
        embedder.max_batch_tokens = budget


def test_truncation_keeps_the_special_tokens(embedders, references):
    st, _ = references["bert"]
    long_text = " ".join(TEXTS) * 3
    for name in ("bert", "bert.gguf"):
        embedder = embedders[name]
        (ids,) = embedder.tokenize([long_text])
        expected = st.tokenizer(long_text, truncation=True,
                                max_length=embedder.max_tokens)["input_ids"]
        assert ids == expected and len(ids) == embedder.max_tokens
        with pytest.raises(ValueError, match=r"^input\[1\] has \d+ tokens"):
            embedder.tokenize(["fine", long_text], truncate=False)
        with pytest.raises(ValueError, match=r"^input\[0\] has \d+ tokens, more than"):
            embedder.embed([ids + [ids[-1]]])


@needs_nomic
def test_dimensions_cut_then_normalize(embedders):
    embedder = embedders["nomic"]
    ids = embedder.tokenize(TEXTS)
    full = embedder.embed(ids, normalize=False)
    cut = embedder.embed(ids, dimensions=16)
    assert cut.shape == (len(TEXTS), 16)
    assert torch.allclose(cut, F.normalize(full[:, :16], dim=1), atol=1e-6)
    assert embedder.embed(ids, dimensions=64).shape == (len(TEXTS), 64)
    for bad in (0, 65, -1, 2.5, True):
        with pytest.raises(ValueError, match="^dimensions must be an integer from 1 to 64"):
            embedder.embed(ids, dimensions=bad)


def test_bad_input_names_the_field(models, embedders):
    embedder = embedders["bert"]
    with pytest.raises(ValueError, match="^input must hold"):
        embedder.embed([])
    with pytest.raises(ValueError, match=r"^input\[1\] has no tokens"):
        embedder.embed([[2, 3], []])
    with pytest.raises(ValueError, match=r"^input\[0\] holds a token id outside"):
        embedder.embed([[2, embedder.vocab_size, 3]])
    with pytest.raises(ValueError, match=r"^input\[0\] must hold integer token ids"):
        embedder.embed([[2, "3"]])
    with pytest.raises(ValueError, match=r"^input\[0\] must be a string"):
        embedder.tokenize([3])
    with pytest.raises(ValueError, match="^pooling must be one of"):
        Embedder.from_encoder(load_encoder(models["bert"]), pooling="max")


def test_bfloat16_is_close_to_float32(models, embedders):
    ids = embedders["bert"].tokenize(TEXTS)
    bf16 = Embedder.from_path(models["bert"], dtype="bfloat16")
    cos = F.cosine_similarity(bf16.embed(ids), embedders["bert"].embed(ids))
    assert cos.min() > 0.99


def test_cased_gguf_vocabulary_keeps_case(tmp_path):
    """A vocabulary with capitalized pieces is a cased model's: the GGUF tokenizer does not
    lowercase it (llama.cpp would), matching the model's own tokenizer."""
    from tokenizers import Tokenizer

    path = save_bert_dir(tmp_path / "cased", seed=4)
    cased = train_wordpiece(lowercase=False)
    cased.save(str(path / "tokenizer.json"))
    config = json.loads((path / "config.json").read_text())
    config["vocab_size"] = cased.get_vocab_size()
    (path / "config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file, save_file

    state = load_file(str(path / "model.safetensors"))
    word = state["embeddings.word_embeddings.weight"]
    state["embeddings.word_embeddings.weight"] = torch.randn(cased.get_vocab_size(),
                                                             word.shape[1])
    save_file(state, str(path / "model.safetensors"))
    gguf_path = write_encoder_gguf(path, tmp_path / "cased.gguf", "bert")
    reference = Tokenizer.from_file(str(path / "tokenizer.json"))
    embedder = Embedder.from_path(gguf_path)
    for text in TEXTS:
        assert embedder.tokenize([text])[0] == reference.encode(text).ids, text
    assert embedder.tokenize(["The"]) != embedder.tokenize(["the"])


@needs_nomic
def test_original_nomic_config_dialect(models):
    """nomic-embed-text's own config.json (n_embd, n_layer, rotary_emb_base, ...), where
    n_positions 8192 is more than the 2048 it was trained on (max_trained_positions)."""
    raw = json.loads((models["nomic"] / "config.json").read_text())
    ours = encoder_config_from_hf(raw)
    original = {
        "architectures": ["NomicBertModel"], "model_type": "nomic_bert",
        "vocab_size": raw["vocab_size"], "n_embd": 64, "n_layer": 2, "n_head": 4,
        "n_inner": 96, "n_positions": 8192, "max_trained_positions": 128,
        "rotary_emb_base": 1000, "rotary_emb_fraction": 1.0, "rotary_emb_interleaved": False,
        "layer_norm_epsilon": 1e-12, "activation_function": "swiglu", "prenorm": False,
        "qkv_proj_bias": False, "mlp_fc1_bias": False, "mlp_fc2_bias": False,
        "type_vocab_size": 2, "causal": False,
    }
    assert encoder_config_from_hf(original) == ours
    with pytest.raises(ModelLoadError, match="prenorm=True is not supported"):
        encoder_config_from_hf({**original, "prenorm": True})
    with pytest.raises(ModelLoadError, match="rotary_emb_fraction=0.5"):
        encoder_config_from_hf({**original, "rotary_emb_fraction": 0.5})


def test_load_errors_name_the_problem(models, tmp_path, tiny_llama_gguf, tiny_llama_dir):
    assert encoder_architecture(tiny_llama_gguf) is None
    assert encoder_architecture(tiny_llama_dir) is None
    with pytest.raises(ModelLoadError, match="'llama' model, not an encoder"):
        load_encoder(tiny_llama_gguf)
    with pytest.raises(ModelLoadError, match="unsupported encoder architecture"):
        load_encoder(tiny_llama_dir)

    reranker = tmp_path / "reranker"
    shutil.copytree(models["bert"], reranker)
    config = json.loads((reranker / "config.json").read_text())
    config["architectures"] = ["BertForSequenceClassification"]
    (reranker / "config.json").write_text(json.dumps(config))
    assert encoder_architecture(reranker) is None

    broken = tmp_path / "dense"
    shutil.copytree(models["bert"], broken)
    modules = json.loads((broken / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense",
                    "type": "sentence_transformers.models.Dense"})
    (broken / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ModelLoadError, match="Dense' is not supported"):
        load_encoder(broken)

    from safetensors.torch import load_file, save_file

    missing = tmp_path / "missing"
    shutil.copytree(models["bert"], missing)
    state = load_file(str(missing / "model.safetensors"))
    del state["encoder.layer.1.output.dense.weight"]
    save_file(state, str(missing / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="missing tensor 'encoder.layer.1.output.dense"):
        load_encoder(missing)

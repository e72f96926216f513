"""Loaders: GGUF (quant types, Q/K un-permutation, config), HF directories, dummy, errors."""

from __future__ import annotations

import json
import math
import shutil

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pagedserve.config import ModelConfig
from pagedserve.loader import ModelLoadError, load_model, read_model_info
from pagedserve.loader.gguf import GGUFFile, dequantize_tensor, llama3_scaling_from_freqs

QT = gguf.GGMLQuantizationType


# ---------------------------------------------------------------------------------------------
# Writing small GGUF files


def _write_gguf(path, arch: str, kv: dict, tensors: dict) -> None:
    """tensors: name -> float32 array, or (raw array, type): bytes (rows, bytes per row), or
    float16 values."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in kv.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    for name, tensor in tensors.items():
        if isinstance(tensor, tuple):
            raw, qtype = tensor
            writer.add_tensor(name, raw, raw_dtype=qtype if raw.dtype == np.uint8 else None)
        else:
            writer.add_tensor(name, np.ascontiguousarray(tensor, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _minimal_llama(skip: str | None = None, quantized: dict | None = None) -> tuple[dict, dict]:
    """A 1-layer llama (hidden 32, vocab 16) in GGUF names; `skip` leaves a tensor out."""
    rng = np.random.default_rng(0)
    kv = {"llama.block_count": 1, "llama.context_length": 64, "llama.embedding_length": 32,
          "llama.feed_forward_length": 32, "llama.attention.head_count": 2,
          "llama.attention.head_count_kv": 2}
    shapes = {"token_embd.weight": (16, 32), "output_norm.weight": (32,),
              "output.weight": (16, 32), "blk.0.attn_norm.weight": (32,),
              "blk.0.ffn_norm.weight": (32,), "blk.0.attn_q.weight": (32, 32),
              "blk.0.attn_k.weight": (32, 32), "blk.0.attn_v.weight": (32, 32),
              "blk.0.attn_output.weight": (32, 32), "blk.0.ffn_gate.weight": (32, 32),
              "blk.0.ffn_up.weight": (32, 32), "blk.0.ffn_down.weight": (32, 32)}
    tensors = {name: rng.standard_normal(shape).astype(np.float32)
               for name, shape in shapes.items() if name != skip}
    tensors.update(quantized or {})
    return kv, tensors


# ---------------------------------------------------------------------------------------------
# Quantization types


QUANTIZE_TOLERANCE = {  # max |error| / max |value|
    QT.F32: 0.0, QT.F16: 1e-3, QT.BF16: 1e-2, QT.Q8_0: 1e-2,
    QT.Q5_0: 0.05, QT.Q5_1: 0.05, QT.Q4_0: 0.1, QT.Q4_1: 0.1,
}


def _f16(x: float) -> bytes:
    return np.float16(x).tobytes()


def _pack_q4_k(d, dmin, sc, mn, q) -> bytes:
    """One Q4_K block: 8 sub-blocks of 32 with 6-bit scale/min, 4-bit quants."""
    scales = bytearray(12)
    for j in range(4):
        scales[j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6)
        scales[j + 4] = (mn[j] & 63) | ((mn[j + 4] >> 4) << 6)
        scales[j + 8] = (sc[j + 4] & 15) | ((mn[j + 4] & 15) << 4)
    qs = bytearray(128)
    for c in range(4):
        for i in range(32):
            qs[32 * c + i] = q[64 * c + i] | (q[64 * c + 32 + i] << 4)
    return _f16(d) + _f16(dmin) + bytes(scales) + bytes(qs)


def _pack_q5_k(d, dmin, sc, mn, q) -> bytes:
    """One Q5_K block: as Q4_K plus a fifth bit per quant in qh."""
    q4 = _pack_q4_k(d, dmin, sc, mn, [v & 15 for v in q])
    qh = bytearray(32)
    for c in range(4):
        for i in range(32):
            qh[i] |= ((q[64 * c + i] >> 4) << (2 * c)) | ((q[64 * c + 32 + i] >> 4) << (2 * c + 1))
    return q4[:16] + bytes(qh) + q4[16:]


def _pack_q6_k(d, scales, q) -> bytes:
    """One Q6_K block: 16 int8 scales (one per 16 values), 6-bit quants offset by 32."""
    ql, qh = bytearray(128), bytearray(64)
    for n in range(2):
        for i in range(32):
            q1, q2, q3, q4 = (q[128 * n + i + 32 * k] for k in range(4))
            ql[64 * n + i] = (q1 & 15) | ((q3 & 15) << 4)
            ql[64 * n + 32 + i] = (q2 & 15) | ((q4 & 15) << 4)
            qh[32 * n + i] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)
    return bytes(ql) + bytes(qh) + np.array(scales, dtype=np.int8).tobytes() + _f16(d)


def _k_quant_blocks(rng, qtype) -> tuple[bytes, np.ndarray]:
    """A hand-packed block of `qtype` and the values it stands for."""
    d, dmin = 0.5, 0.25
    if qtype == QT.Q6_K:
        q = rng.integers(0, 64, 256).tolist()
        scales = rng.integers(-128, 128, 16).tolist()
        expected = [d * scales[i // 16] * (q[i] - 32) for i in range(256)]
        return _pack_q6_k(d, scales, q), np.array(expected, dtype=np.float32)
    top = 16 if qtype == QT.Q4_K else 32
    q = rng.integers(0, top, 256).tolist()
    sc, mn = rng.integers(0, 64, 8).tolist(), rng.integers(0, 64, 8).tolist()
    sc[5], mn[6] = 63, 48  # high bits of the packed 6-bit values are exercised
    expected = [d * sc[i // 32] * q[i] - dmin * mn[i // 32] for i in range(256)]
    pack = _pack_q4_k if qtype == QT.Q4_K else _pack_q5_k
    return pack(d, dmin, sc, mn, q), np.array(expected, dtype=np.float32)


def test_dequantize_each_claimed_type(tmp_path):
    rng = np.random.default_rng(1)
    data = rng.standard_normal((4, 256)).astype(np.float32)
    tensors, expected = {}, {}
    for qtype in QUANTIZE_TOLERANCE:
        name = f"t.{qtype.name}"
        if qtype == QT.F32:
            tensors[name] = data
        else:
            tensors[name] = (gguf.quants.quantize(data, qtype), qtype)
        expected[name] = (data, QUANTIZE_TOLERANCE[qtype] * float(np.abs(data).max()) + 1e-7)
    for qtype in (QT.Q4_K, QT.Q5_K, QT.Q6_K):
        blocks = [_k_quant_blocks(rng, qtype) for _ in range(6)]  # 3 rows x 2 blocks
        raw = np.frombuffer(b"".join(b for b, _ in blocks), dtype=np.uint8).reshape(3, -1)
        values = np.concatenate([v for _, v in blocks]).reshape(3, 512)
        tensors[f"t.{qtype.name}"] = (raw, qtype)
        expected[f"t.{qtype.name}"] = (values, 1e-6 * float(np.abs(values).max()))
    path = tmp_path / "types.gguf"
    _write_gguf(path, "llama", {}, tensors)
    f = GGUFFile(path)
    for name, (values, tolerance) in expected.items():
        got = dequantize_tensor(f, f.tensors[name])
        assert got.shape == values.shape, name
        assert float(np.abs(got - values).max()) <= tolerance, name


def test_unsupported_quant_type_names_type_and_tensor(tmp_path):
    raw = np.zeros((32, 32 // 32 * 40), dtype=np.uint8)  # Q8_1: 40 bytes per 32 values
    kv, tensors = _minimal_llama(quantized={"blk.0.ffn_up.weight": (raw, QT.Q8_1)})
    path = tmp_path / "q81.gguf"
    _write_gguf(path, "llama", kv, tensors)
    with pytest.raises(ModelLoadError, match=r"blk\.0\.ffn_up\.weight.*Q8_1"):
        load_model(path)


# ---------------------------------------------------------------------------------------------
# The bundled SmolLM2 GGUF


@pytest.fixture(scope="module")
def smollm_model(smollm_gguf):
    return load_model(smollm_gguf)


@pytest.mark.slow
def test_smollm_weights_equal_transformers(smollm_gguf, smollm_model):
    transformers = pytest.importorskip("transformers")
    ours = smollm_model
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm_gguf.parent), gguf_file=smollm_gguf.name, dtype=torch.float32
    ).state_dict()
    assert "lm_head.weight" not in ours.weights and ours.config.tie_word_embeddings
    assert set(ours.weights) == set(reference) - {"lm_head.weight"}
    names = ["model.embed_tokens.weight", "model.norm.weight"] + [
        f"model.layers.{i}.{n}" for i in (0, 17, 29) for n in (
            "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
            "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.down_proj.weight",
            "input_layernorm.weight")]
    for name in names:
        assert ours.weights[name].shape == reference[name].shape, name
        torch.testing.assert_close(ours.weights[name], reference[name], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_smollm_config_tokenizer_and_info(smollm_gguf, smollm_model):
    model = smollm_model
    c = model.config
    assert (c.architecture, c.num_layers, c.hidden_size, c.intermediate_size) == (
        "llama", 30, 576, 1536)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (9, 3, 64, 49152)
    assert c.rope_theta == 100000.0 and c.rms_norm_eps == 1e-5
    assert c.max_position_embeddings == 8192 and c.rope_scaling is None
    assert model.tokenizer is not None and model.tokenizer.eos_token_ids == [2]
    assert model.info == read_model_info(smollm_gguf)


def test_read_model_info_is_metadata_only(smollm_gguf):
    info = read_model_info(smollm_gguf)
    assert info.format == "gguf" and info.quantization == "Q4_1"
    assert info.family == "llama" and info.architecture == "llama"
    assert info.context_length == 8192
    assert 134_000_000 < info.parameter_count < 135_000_000
    assert info.file_size == smollm_gguf.stat().st_size
    assert "tokenizer.ggml.tokens" not in info.metadata
    assert info.metadata["tokenizer.ggml.pre"] == "smollm"
    json.dumps(info.metadata)


# ---------------------------------------------------------------------------------------------
# A GGUF written from the tiny HF Llama, as llama.cpp's converter writes it


def test_tiny_llama_gguf_equals_its_safetensors(tiny_llama_gguf, tiny_llama_dir):
    from_gguf = load_model(tiny_llama_gguf, progress=True)
    from_hf = load_model(tiny_llama_dir)
    assert from_gguf.config == from_hf.config  # incl. llama3 rope_scaling from rope_freqs
    assert set(from_gguf.weights) == set(from_hf.weights)
    for name, tensor in from_hf.weights.items():
        assert torch.equal(from_gguf.weights[name], tensor), name  # q/k un-permuted exactly


def test_llama3_scaling_recovered_from_rope_freqs():
    # Llama 3.1's parameters, through the HF formula, back to the parameters
    base, dim, factor, low, high, orig = 500000.0, 128, 8.0, 1.0, 4.0, 8192
    freqs = []
    for i in range(dim // 2):
        wavelen = 2 * math.pi * base ** (2 * i / dim)
        if wavelen < orig / high:
            freqs.append(1.0)
        elif wavelen > orig / low:
            freqs.append(factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            freqs.append(1 / ((1 - smooth) / factor + smooth))
    scaling = llama3_scaling_from_freqs(np.array(freqs, dtype=np.float32), base, dim)
    assert scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert llama3_scaling_from_freqs(np.ones(64), base, dim) is None


def test_gguf_dtype(tiny_llama_gguf):
    model = load_model(tiny_llama_gguf, dtype=torch.bfloat16)
    assert {t.dtype for t in model.weights.values()} == {torch.bfloat16}
    assert load_model(tiny_llama_gguf, dtype="float16").weights["model.norm.weight"].dtype == (
        torch.float16)


# ---------------------------------------------------------------------------------------------
# Hugging Face directories


def test_tiny_llama_dir(tiny_llama_dir):
    model = load_model(tiny_llama_dir)
    saved = load_file(str(tiny_llama_dir / "model.safetensors"))
    assert set(model.weights) == set(saved)
    for name, tensor in saved.items():
        assert torch.equal(model.weights[name], tensor), name
    assert model.config == ModelConfig(
        architecture="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6,
        rope_theta=500000.0, max_position_embeddings=512, tie_word_embeddings=False,
        attention_bias=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    )
    assert model.tokenizer is None  # no tokenizer files in this directory
    assert model.generation_config["eos_token_id"] == 2
    info = model.info
    assert (info.format, info.quantization, info.family, info.architecture) == (
        "safetensors", "F32", "llama", "LlamaForCausalLM")
    assert info.parameter_count == sum(t.numel() for t in saved.values())


def test_tiny_qwen2_dir_is_tied_with_biases(tiny_qwen2_dir):
    model = load_model(tiny_qwen2_dir, dtype=torch.float16)
    c = model.config
    assert c.architecture == "qwen2" and c.tie_word_embeddings and c.attention_bias
    assert c.rope_scaling is None and c.rope_theta == 10000.0
    assert "lm_head.weight" not in model.weights
    saved = load_file(str(tiny_qwen2_dir / "model.safetensors"))
    for name, tensor in saved.items():
        assert torch.equal(model.weights[name], tensor.half()), name
    assert "model.layers.1.self_attn.k_proj.bias" in model.weights


def test_sharded_dir_loads(tiny_qwen2_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_qwen2_dir))
    out = tmp_path / "sharded"
    reference.save_pretrained(out, max_shard_size="40KB")
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("*.safetensors"))) > 2
    model = load_model(out)
    for name, tensor in load_file(str(tiny_qwen2_dir / "model.safetensors")).items():
        assert torch.equal(model.weights[name], tensor), name
    assert read_model_info(out).file_size == sum(f.stat().st_size for f in out.glob("*.safetensors"))


def test_bf16_dir_reports_bf16(tiny_llama_dir, tmp_path):
    out = tmp_path / "bf16"
    shutil.copytree(tiny_llama_dir, out)
    saved = load_file(str(out / "model.safetensors"))
    save_file({k: v.bfloat16() for k, v in saved.items()}, str(out / "model.safetensors"))
    assert read_model_info(out).quantization == "BF16"
    model = load_model(out)
    assert model.weights["model.norm.weight"].dtype == torch.float32


def test_tokenized_dir_loads_everything(tiny_llama_tokenized_dir):
    model = load_model(tiny_llama_tokenized_dir)
    tok = model.tokenizer
    assert tok is not None and tok.chat_template and not tok.add_bos
    assert model.generation_config["eos_token_id"] == [2, 3]
    assert set(tok.eos_token_ids) == {2, 3} and tok.bos_token_id == 1
    assert max(tok.encode("Hello world 😀 日本語")) < model.config.vocab_size


# ---------------------------------------------------------------------------------------------
# Dummy weights


def test_dummy_from_config_and_from_dir(tiny_qwen2_dir):
    config = ModelConfig(architecture="llama", vocab_size=100, hidden_size=32,
                         intermediate_size=64, num_layers=3, num_heads=4, num_kv_heads=2,
                         head_dim=8)
    a = load_model(None, load_format="dummy", config=config)
    b = load_model(None, load_format="dummy", config=config)
    assert a.weights.keys() == b.weights.keys()
    assert all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)
    assert a.weights["model.layers.2.self_attn.k_proj.weight"].shape == (16, 32)
    assert a.weights["model.layers.0.mlp.down_proj.weight"].shape == (32, 64)
    assert a.weights["lm_head.weight"].shape == (100, 32)
    assert sum(t.numel() for t in a.weights.values()) == config.num_parameters
    q = load_model(tiny_qwen2_dir, load_format="dummy", dtype=torch.bfloat16)
    assert q.config.attention_bias and "model.layers.1.self_attn.q_proj.bias" in q.weights
    assert q.weights["model.embed_tokens.weight"].dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# Errors


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope.gguf")
    with pytest.raises(ModelLoadError, match="does not exist"):
        read_model_info(tmp_path / "nope")


def test_random_bytes(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        load_model(junk)
    junk.write_bytes(b"GGUF" + np.random.default_rng(0).bytes(5000))
    with pytest.raises(ModelLoadError, match="corrupt|truncated"):
        load_model(junk)


@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.02])
def test_truncated_gguf(tiny_llama_gguf, tmp_path, fraction):
    data = tiny_llama_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ModelLoadError, match="truncated"):
        load_model(cut)
    with pytest.raises(ModelLoadError, match="truncated"):
        read_model_info(cut)


@pytest.mark.slow
def test_bundled_gguf_cut_in_half(smollm_gguf, tmp_path):
    cut = tmp_path / "half.gguf"
    with smollm_gguf.open("rb") as f:
        cut.write_bytes(f.read(smollm_gguf.stat().st_size // 2))
    with pytest.raises(ModelLoadError, match="truncated"):
        load_model(cut)


def test_unsupported_architecture(tmp_path, tiny_llama_dir):
    path = tmp_path / "gpt2.gguf"
    _write_gguf(path, "gpt2", {}, {"token_embd.weight": np.zeros((4, 4), np.float32)})
    with pytest.raises(ModelLoadError, match="unsupported architecture 'gpt2'"):
        load_model(path)
    hf_dir = tmp_path / "hf"
    shutil.copytree(tiny_llama_dir, hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="unsupported architecture 'GPT2LMHeadModel'"):
        load_model(hf_dir)


def test_missing_tensor(tmp_path, tiny_qwen2_dir):
    kv, tensors = _minimal_llama(skip="blk.0.ffn_up.weight")
    path = tmp_path / "missing.gguf"
    _write_gguf(path, "llama", kv, tensors)
    with pytest.raises(ModelLoadError, match=r"missing tensor 'model\.layers\.0\.mlp\.up_proj"):
        load_model(path)
    kv, tensors = _minimal_llama()
    _write_gguf(tmp_path / "ok.gguf", "llama", kv, tensors)
    assert load_model(tmp_path / "ok.gguf").config.num_layers == 1

    hf_dir = tmp_path / "hf"
    shutil.copytree(tiny_qwen2_dir, hf_dir)
    saved = load_file(str(hf_dir / "model.safetensors"))
    del saved["model.layers.1.self_attn.q_proj.bias"]
    save_file(saved, str(hf_dir / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"model\.layers\.1\.self_attn\.q_proj\.bias"):
        load_model(hf_dir)


def test_dir_without_weights(tmp_path, tiny_llama_dir):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    shutil.copy(tiny_llama_dir / "config.json", hf_dir)
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        load_model(hf_dir)
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)


def test_truncated_or_junk_safetensors(tmp_path, tiny_llama_dir):
    hf_dir = tmp_path / "hf"
    shutil.copytree(tiny_llama_dir, hf_dir)
    weights = hf_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated"):
        load_model(hf_dir)
    weights.write_bytes(b"\x01" * 1000)
    with pytest.raises(ModelLoadError, match="not a safetensors file"):
        load_model(hf_dir)

"""The dequantized-weight cache: a second load reads it, a bad file or opt-out falls back."""

from __future__ import annotations

import logging

import torch

from pagedserve.loader import load_model, weight_cache


def test_second_load_comes_from_the_cache_with_identical_weights(
        tiny_llama_gguf, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PAGEDSERVE_HOME", str(tmp_path))
    caplog.set_level(logging.INFO, logger="pagedserve.loader.gguf")
    first = load_model(tiny_llama_gguf)
    file = weight_cache.cache_file(tiny_llama_gguf, torch.float32)
    assert file.is_file()
    assert "from GGUF tensors" in caplog.text
    caplog.clear()
    second = load_model(tiny_llama_gguf)
    assert "from the dequantized-weight cache" in caplog.text
    assert first.weights.keys() == second.weights.keys()
    for name, w in first.weights.items():
        assert torch.equal(w, second.weights[name]), name
    assert first.config == second.config


def test_a_corrupt_cache_file_is_ignored_and_opting_out_writes_nothing(
        tiny_llama_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_HOME", str(tmp_path))
    file = weight_cache.cache_file(tiny_llama_gguf, torch.float32)
    file.parent.mkdir(parents=True)
    file.write_bytes(b"not a safetensors file")
    loaded = load_model(tiny_llama_gguf)
    assert loaded.weights  # loaded from the GGUF, and the cache rewritten
    assert weight_cache.load(tiny_llama_gguf, torch.float32) is not None

    monkeypatch.setenv("PAGEDSERVE_HOME", str(tmp_path / "other"))
    monkeypatch.setenv("PAGEDSERVE_WEIGHT_CACHE", "0")
    load_model(tiny_llama_gguf)
    assert not (tmp_path / "other").exists()
